"""The repair engine: train a row patch by KL distillation against the intact model.

`engine`, not `repair`: stages/repair.py is the repair *stage* (run directory, baselines, evaluation, record),
which calls this engine to train. Three parts and their settings:

- patch.py: the parametrised patch, a row patch trained in a space (weight, balanced, column) with a mask;
- objective.py: the distillation objective (teacher, KL loss in chunks, the held-out check);
- optimize.py: the two optimisers (L-BFGS, first-order) behind one budget of loss evaluations;
- config.py: the settings, LbfgsConfig | FirstOrderConfig (a union on `optimizer`), and the named recipes;
- train.py: `train`, which puts them together, with checkpoints (io/checkpoint.py) and the train log.
"""
