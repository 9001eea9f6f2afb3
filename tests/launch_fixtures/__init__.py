"""Helpers the launch tests run inside SLURM jobs or instead of SLURM's commands."""
