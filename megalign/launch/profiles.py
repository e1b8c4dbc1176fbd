"""Cluster profiles: what a Slurm cluster needs from a megalign job, in one YAML file per cluster.

`launch/clusters/NAME.yaml` ships a800-ib, h100-ib and local-cpu (the tests' cluster); a user adds their own
there, in a directory named by $MEGALIGN_CLUSTERS, or passes a file path. Unknown keys and wrong types are one-line
errors naming the file and the key. See launch/README.md for what each setting is for.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megalign.errors import MegalignError, OptionError

SHIPPED = Path(__file__).resolve().parents[2] / "launch" / "clusters"


@dataclass(frozen=True)
class Container:
    image: Optional[str] = None  # pyxis --container-image (an enroot .sqsh or a registry image); None: no container
    mounts: list[str] = field(default_factory=list)  # pyxis --container-mounts, SRC:DST each


@dataclass(frozen=True)
class ClusterProfile:
    name: str = ""
    description: str = ""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: int = 8  # ranks per node; 0: CPU-only nodes (give --tasks-per-node at submission)
    cpus_per_node: int = 64  # CPUs Slurm may give a job on one node (split over its ranks)
    exclusive: bool = True  # whole nodes: no other job shares the GPUs' PCIe/NVLink/NICs
    time: str = "24:00:00"  # default time limit (sbatch --time)
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit: time to finish a step and save
    max_restarts: int = 20  # requeues after a time limit, preemption or a failure with progress
    max_stalled: int = 2  # attempts in a row that fail without a new checkpoint before it stops requeueing
    python: Optional[str] = None  # the python with megalign on the nodes; None: the submitting one (no container)
    container: Container = field(default_factory=Container)
    env: dict[str, str] = field(default_factory=dict)  # exported for every rank (NCCL, CUDA, PyTorch)
    overrides: list[str] = field(default_factory=list)  # config overrides for this cluster, before the user's
    sbatch: list[str] = field(default_factory=list)  # more sbatch options, e.g. --constraint=a800


def available() -> dict[str, Path]:
    """Profile names -> files: the shipped ones, then $MEGALIGN_CLUSTERS directories (a later one wins)."""
    dirs = [SHIPPED] + [Path(d) for d in os.environ.get("MEGALIGN_CLUSTERS", "").split(os.pathsep) if d]
    found = {}
    for d in dirs:
        for path in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found[path.stem] = path
    return found


def load_profile(name_or_path: str) -> ClusterProfile:
    """A profile by name (see `available`) or from a YAML file."""
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or path.is_file()):
        known = available()
        if name_or_path not in known:
            names = ", ".join(sorted(known)) or "none"
            raise OptionError("cluster", f"{name_or_path!r} is not a cluster profile; known: {names} "
                                         f"(launch/clusters/*.yaml, $MEGALIGN_CLUSTERS), or give a .yaml path")
        path = known[name_or_path]
    if not path.is_file():
        raise OptionError("cluster", f"{path}: no such file")
    try:
        raw = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(ClusterProfile), raw)
        profile = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        what = str(e).splitlines()[0]
        raise MegalignError(f"cluster profile {path}: {f'key {key}: ' if key else ''}{what}") from None
    except Exception as e:  # YAML syntax
        raise MegalignError(f"cluster profile {path}: cannot parse: {' '.join(str(e).split())[:300]}") from None
    profile = dataclasses.replace(profile, name=profile.name or path.stem,
                                  env={k: str(v) for k, v in profile.env.items()})
    for key, value in (("gpus_per_node", profile.gpus_per_node), ("cpus_per_node", profile.cpus_per_node),
                       ("signal_lead_s", profile.signal_lead_s), ("max_restarts", profile.max_restarts)):
        if value < 0:
            raise MegalignError(f"cluster profile {path}: key {key}={value} must be >= 0")
    if profile.max_stalled < 1:
        raise MegalignError(f"cluster profile {path}: key max_stalled={profile.max_stalled} must be >= 1")
    return profile
