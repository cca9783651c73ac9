"""Distributed bootstrap (torchrun / Slurm / MPI -> ranks), local workers, the CPU compatibility module."""
