"""Running the study elsewhere: several stages at once (parallel) and a SLURM job array (cluster)."""
