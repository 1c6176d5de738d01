"""Input and output: model loading (models), corpora and token windows (corpora), the patch file format
(patchfile), the run directory as one object (rundir.RunDir), the run record it holds (record and its
parts), atomic strict-JSON writes (files), provenance, checkpoints and the train log (checkpoint)."""
