"""Host work off the critical path: the next step's micro-batches are built while this step computes.

Building a micro-batch is host work (reading the pack, positions, the CP share and its attention plan, then
the host-to-device copy). `Prefetcher` does it for the next step on one background thread while the main
thread runs the current step's forward and backward. It changes nothing but when the work happens:
  - what is built is exactly what the main thread would build (BatchBuilder is a pure function of the pack
    reference), and a prefetch is only used when it is for exactly the packs asked for (else they are built
    in place);
  - memory stays bounded: at most one step ahead;
  - signals are handled by the main thread only (Python delivers them there); a prefetch under way when the
    run stops is waited for or dropped in close(), never half used;
  - an error while prefetching (a damaged pack) is raised where the batch is taken, as it would have been.
On CUDA the batches are pinned and copied on a side stream, and the main stream waits for that copy before
using them; on the CPU the copy is a no-op.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable, Sequence

import torch

from megalign.training.batch import Batch


class Prefetcher:
    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megalign-prefetch")
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._pending: tuple[Hashable, Future] | None = None

    def _build(self, build: Callable[[], Sequence[Batch]]):
        """On the worker: the host batches, then their copy to the device (on CUDA: pinned, on the side
        stream, with the event that marks the copy done)."""
        batches = list(build())
        if not self.cuda:
            return [b.to(self.device) for b in batches], None
        with torch.cuda.stream(self._stream):
            moved = [b.pin_memory().to(self.device) for b in batches]
            done = torch.cuda.Event()
            done.record(self._stream)
        return moved, done

    def submit(self, owner: object, key: Hashable, build: Callable[[], Sequence[Batch]]) -> None:
        """Start building `key`'s batches in the background (dropping a prefetch nobody took). `owner` (the batch
        builder) is held until they are taken: a prefetch matches only the same object, never another one that
        happens to reuse a freed one's id."""
        self.drop()
        self._pending = (owner, key, self._pool.submit(self._build, build))

    def take(self, owner: object, key: Hashable, build: Callable[[], Sequence[Batch]]) -> list[Batch]:
        """`key`'s batches on the device: the prefetched ones if `owner` asked for `key`, else built now."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is owner and pending[1] == key:
            batches, done = pending[2].result()  # re-raises what the build raised
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)
                for b in batches:  # the caching allocator must not reuse them while this stream reads them
                    b.record_stream(torch.cuda.current_stream(self.device))
            return batches
        if pending is not None:
            pending[2].cancel()
        return [b.to(self.device) for b in build()]

    def drop(self) -> None:
        if self._pending is not None:
            self._pending[2].cancel()
            self._pending = None

    def close(self) -> None:
        """Drop what was not taken and stop the worker (waiting for a build under way: at most one step's)."""
        self.drop()
        self._pool.shutdown(wait=True, cancel_futures=True)
