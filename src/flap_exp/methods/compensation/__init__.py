"""Compensation methods: one module each, registered in flap_exp.catalogue.COMPENSATIONS (conf/compensation/)."""
