"""Input and output: model loading (models), corpora and token windows (corpora), patch files (patchfile), the
run directory (rundir) and the run record it holds (record)."""
