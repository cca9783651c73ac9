"""Submitting recipes to a cluster: `medmoe submit` through submitit (Slurm, or local processes)."""
