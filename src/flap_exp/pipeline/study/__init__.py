"""Composing the study: conf/ -> params.yaml and cells.yaml (Hydra), their checks, and the code deps of dvc.yaml."""
