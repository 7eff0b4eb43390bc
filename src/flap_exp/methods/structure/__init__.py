"""Structures: one module each, registered in flap_exp.catalogue.STRUCTURES (conf/structure/).

A structure's entry is its selection function (scores per layer, ArchView, ratio, StructureOptions) -> Selection;
its facts say whether it decides each layer on its own (`per_layer`: it can run inside a sequential pass),
whether it ranks standardized units across layers (`adaptive`, with `units`: the same selection from the
standardize stage's units), whether metric obs may take it as its allocation (`obs_allocation`), and whether it
ranks query-head units (`query_units`). The selection helpers live in flap_exp.structures; modules import them
inside their functions, so listing structures never imports torch.
"""
