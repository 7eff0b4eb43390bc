"""The DVC experiment pipeline: one small module per stage, each called by a thin script in stages/.

Stages (dvc.yaml): prepare -> calibrate -> score -> standardize / search -> compensate -> evaluate
-> track (MLflow) and report. The grid of cells comes from Hydra's conf/ via `cells.expand_grid`.
Nothing here imports torch at module level: composing a config must stay fast.
"""
