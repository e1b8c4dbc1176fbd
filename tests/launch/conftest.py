"""Fixtures of the launch tests: a real local Slurm cluster (skipped where Slurm is not installed) and configs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.launch.slurm_cluster import LocalSlurmCluster, missing

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def write_config(path: Path, dataset: str, output_dir: Path, **sections) -> Path:
    """A tiny model's config (it divides for tp=2) reading `dataset`; `sections` update its sections."""
    cfg = {
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 4,
                  "num_query_groups": 2, "max_position_embeddings": 1024},
        "data": {"path": str(dataset)},
        "parallel": {"tp": 1},
        "training": {"global_batch": 4, "steps": 6, "lr": 1.0e-3, "seed": 7},
        "run": {"output_dir": str(output_dir), "device": "cpu", "progress": False},
    }
    for name, keys in sections.items():
        cfg[name].update(keys)
    path.write_text(yaml.safe_dump(cfg))
    return path


def megalign_submit(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """megalign-submit as a user runs it (a new process), with this checkout first on the path."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "megalign.launch.submit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
