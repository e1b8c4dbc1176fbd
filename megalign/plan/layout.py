"""A layout the planner weighs (TP x PP x CP x DP over the cluster's GPUs, sequence parallelism, recompute) and the
candidates for a cluster: every TP, PP and CP whose product divides the GPU count, DP taking the rest."""

from __future__ import annotations

from dataclasses import dataclass

from megalign.config import RECOMPUTE


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    sp: bool
    recompute: str
    distributed_optimizer: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(world: int, sequence_parallel: bool | None, distributed_optimizer: bool,
               recompute: tuple[str, ...] = RECOMPUTE) -> list[Layout]:
    """Every (tp, pp, cp) whose product divides `world` (dp takes the rest), with each recompute mode.
    sequence_parallel follows the config key: None is on exactly when tp > 1."""
    found = []
    for tp in divisors(world):
        for pp in divisors(world // tp):
            for cp in divisors(world // (tp * pp)):
                sp = tp > 1 if sequence_parallel is None else bool(sequence_parallel)
                for mode in recompute:
                    found.append(Layout(tp, pp, cp, world // (tp * pp * cp), sp, mode, distributed_optimizer))
    return found
