"""Which rank a process is, as its launcher says: torchrun's variables, or those of an `srun` job step. Kept
free of torch and megatron imports, so that a launch checks its config before the slow imports."""

from __future__ import annotations

import os

from megalign.errors import MegalignError

# torchrun's variables win; else an `srun` step's (one task per rank; launch/slurm/train.sbatch sets MASTER_ADDR
# and MASTER_PORT). A batch script's own environment has SLURM_PROCID too, but no SLURM_STEP_ID: a plain
# `python -m megalign.train` there is one process.
SLURM_RANK_VARIABLES = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_STEP_NUM_TASKS"}


def adopt_launcher_env(env=os.environ) -> None:
    """Set RANK / LOCAL_RANK / WORLD_SIZE from an srun step's variables when no torchrun-style launcher set them."""
    if "RANK" in env or "SLURM_STEP_ID" not in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) < 2:
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise MegalignError(f"srun started {env['SLURM_STEP_NUM_TASKS']} tasks but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not set (rank 0's rendezvous address); "
                            "launch/slurm/train.sbatch sets both")
    for ours, slurms in SLURM_RANK_VARIABLES.items():
        env[ours] = env[slurms]


def world_size_from_env() -> int:
    adopt_launcher_env()
    return int(os.environ.get("WORLD_SIZE", "1"))
