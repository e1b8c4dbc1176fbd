"""Preemption: SLURM sends SIGTERM (or the SIGUSR1 asked for with `--signal`) before it stops a job. The run
finishes the step it is in, saves, and exits cleanly; rerunning the same command resumes from that save.

A signal reaches each process at its own moment, so the ranks agree at the end of every step (one all-reduce of
a flag): if any rank was signalled, all of them save after the same step.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    def __init__(self, device="cpu"):  # a torch.device or its name (torch is imported only when ranks agree)
        self.device = device
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"

    def agreed(self) -> bool:
        """True on every rank when any rank has been signalled (a collective: call it on all ranks)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
