"""Exact live bytes of torch's CPU allocator over a stretch of code, at marks and at their peaks.

torch's profiler with profile_memory=True reports every CPU allocation and free made while it runs, with the
allocator's running total (c10's ProfiledCPUMemoryReporter): the bytes of tensors alive, not the process's
resident memory. RSS also holds the Python and torch runtime, libraries, freed memory malloc keeps for reuse
and pages not yet touched, none of which the planner models; this counts what tensors hold.

The reporter counts a block only while profiling is on in the thread that allocates or frees it: a tensor
allocated in the main thread and freed in another one (gloo's worker threads drop their work's tensors, e.g. the
clone of the gradient buffer in the distributed optimizer's reduce-scatter) would stay counted forever. c10's
flag `caffe2_report_cpu_memory_usage` makes it count every thread's; it is set here (through ctypes: libc10
exports it). Blocks allocated before the flag is set are never counted, nor their frees: marks are differences.

    with Allocations() as a:
        a.mark("start"); build(); a.mark("built"); step(); a.mark("stepped")
    a.level("built") - a.level("start")        # bytes still alive that build() allocated
    a.peak("built", "stepped") - a.level("built")  # what step() needed at its peak, above that
"""

from __future__ import annotations

import json
import os
import tempfile


def _count_every_thread() -> None:
    import ctypes

    import torch

    c10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(c10, "FLAGS_caffe2_report_cpu_memory_usage").value = True


class Allocations:
    def __init__(self):
        self._marks: dict[str, object] = {}
        self._levels: list[int] = []  # live bytes after each allocation or free, in order
        self._at: dict[str, int] = {}  # mark -> the index of its allocation in _levels

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        _count_every_thread()
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def mark(self, name: str) -> None:
        """A named point: a small allocation of a size of its own, kept alive so that no later block reuses it."""
        import torch

        self._marks[name] = torch.empty(4093 + 2 * len(self._marks), dtype=torch.uint8)

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            self._profile.export_chrome_trace(path)
            with open(path) as f:
                events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
        finally:
            os.remove(path)
        events.sort(key=lambda e: e["ts"])  # stable: events of the same microsecond keep their order
        self._levels = [e["args"]["Total Allocated"] for e in events]
        for name, tensor in self._marks.items():
            key = (tensor.data_ptr(), tensor.numel())
            found = [i for i, e in enumerate(events) if (e["args"]["Addr"], e["args"]["Bytes"]) == key]
            if not found:
                raise RuntimeError(f"mark {name!r} was not recorded by the profiler")
            self._at[name] = at = found[-1]  # alive to the end: no later block took its address
            for i in range(at, len(self._levels)):  # the marks themselves are not counted
                self._levels[i] -= tensor.numel()
        self._marks.clear()

    def level(self, name: str) -> int:
        """Live bytes when the mark was taken."""
        return self._levels[self._at[name]]

    def peak(self, start: str, end: str) -> int:
        """The most bytes alive between two marks."""
        return max(self._levels[self._at[start]:self._at[end] + 1])
