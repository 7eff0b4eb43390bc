"""Loaded by Hydra's plugin scan when `dvc exp run` composes conf/ (.dvc/config: hydra.plugins_path = conf):
registers the `flap_cells` resolver that conf/config.yaml uses to expand the grid."""
from flap_exp.pipeline.study.cells import register_resolvers

register_resolvers()
