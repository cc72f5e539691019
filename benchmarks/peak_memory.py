"""Peak memory of a few training steps above the state before them, shared by the benchmarks.

Meant to run in a fresh process per measurement: freed memory from earlier work would otherwise be reused
without showing up as growth.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
from collections.abc import Callable
from pathlib import Path

import torch


def _proc_status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1))


def peak_increase(step: Callable[[], None], steps: int, device: str) -> dict:
    """Run ``step`` ``steps`` times; return the peak memory above the moment before, and how it was read."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return {
            "peak_increase_bytes": torch.cuda.max_memory_allocated() - baseline,
            "baseline_bytes": baseline,
            "how": "cuda",
        }
    with contextlib.suppress(OSError, AttributeError):  # hand construction garbage back: baseline = resident model
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
        baseline = _proc_status_kib("VmRSS") * 1024
        for _ in range(steps):
            step()
        peak = _proc_status_kib("VmHWM") * 1024
        how = "VmHWM"
    except OSError:  # no /proc peak reset: ru_maxrss also holds any construction-time peak (an over-estimate)
        import psutil

        baseline = psutil.Process().memory_info().rss
        for _ in range(steps):
            step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        how = "ru_maxrss"
    return {"peak_increase_bytes": peak - baseline, "baseline_bytes": baseline, "how": how}


def describe(hows: list[str]) -> str:
    """How the numbers were read, for the results file."""
    if hows == ["cuda"]:
        return (
            "torch.cuda.max_memory_allocated() over the training steps minus torch.cuda.memory_allocated() right "
            "after model construction, in a fresh subprocess per run (after reset_peak_memory_stats): gradients, "
            "AdamW state, activations and the generated weights; not the caching allocator's reserve"
        )
    if hows == ["VmHWM"]:
        return (
            "peak RSS (VmHWM from /proc/self/status, reset through /proc/self/clear_refs right after model "
            "construction, gc.collect() and malloc_trim) minus the RSS at that moment, over the training steps, "
            "in a fresh subprocess per run: the whole process's resident growth - gradients, AdamW state, "
            "activations, the generated weights, allocator slack and any lazily loaded kernels; not the model "
            "weights (already resident in the baseline)"
        )
    return (
        "resource.getrusage ru_maxrss over the whole run minus psutil RSS right after model construction, in a fresh "
        "subprocess per run (includes any construction-time peak above the baseline)"
    )
