"""Run ``parcae_megatron.train`` on SLURM: one command writes a run directory with an sbatch
script and submits it.

- :mod:`launch.submit` -- the CLI (``python -m launch.submit --config ... --nodes ...``).
- :mod:`launch.sweep` -- a list of configs (a sweep file) as one job array.
- :mod:`launch.sbatch` -- renders the sbatch script; every user value is shell-quoted.
- ``launch/job_body.sh`` -- what the job does in its allocation: start one task per GPU with
  ``srun``, forward the time-limit warning to the ranks (they checkpoint and exit), requeue,
  bounded restarts after crashes.
- :mod:`launch.rank` -- the per-task wrapper: torch.distributed variables from SLURM's.
- ``launch/local_cluster.sh`` -- a SLURM cluster on one machine to try all of this.
"""
