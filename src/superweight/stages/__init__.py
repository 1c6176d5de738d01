"""The pipeline's stages, one library call per command: evaluate, detect, sweep, train (the engine), repair,
analyze, sparsify, and pipeline (`superweight run`, which chains them)."""
