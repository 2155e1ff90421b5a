"""Interleaved timing: A, B, A, B, ... in one process, warm-up discarded, median of the timed runs.

Interleaving spreads slow drifts of the machine (frequency, other processes, page cache) over both models
instead of charging them to whichever model happens to run second.
"""

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor


@dataclass
class Measurement:
    """Throughputs of one model on one workload: one entry per timed run (warm-up runs excluded)."""

    tokens_per_second: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_second)


# glibc malloc settings (mallopt parameter numbers from malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel; True if it took effect.

    By default glibc serves blocks above a (moving) threshold with `mmap` and trims the heap top on `free`, so a
    block of a few MiB freed at the end of one call (a weight gradient, an activation) is page-faulted back in by the
    next: on this machine that cost up to ~1 ms per 4 MiB, swinging a 0.4 ms call by 2-5x depending on the order of
    earlier allocations. jemalloc and tcmalloc (what PyTorch's CPU performance guide recommends) keep such memory;
    this asks glibc for the same (blocks up to 32 MiB from the heap, no trimming), for every implementation alike.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library with mallopt (musl, macOS, Windows): nothing to set
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


# A workload runs once and returns (tokens processed, seconds those tokens took).
Workload = Callable[[], tuple[int, float]]


def timed(run: Callable[[], object], tokens: int) -> Workload:
    """Wrap `run` as a workload timed from its start to its end."""

    def workload() -> tuple[int, float]:
        start = time.perf_counter()
        run()
        return tokens, time.perf_counter() - start

    return workload


def interleaved(workloads: dict[str, Workload], warmup: int, repeats: int) -> dict[str, Measurement]:
    """Run every workload `warmup` untimed rounds then `repeats` timed rounds, alternating between them."""
    for _ in range(warmup):
        for workload in workloads.values():
            workload()
    measurements = {name: Measurement() for name in workloads}
    for _ in range(repeats):
        for name, workload in workloads.items():
            tokens, seconds = workload()
            measurements[name].tokens_per_second.append(tokens / seconds)
    return measurements


class DecodeClock(LogitsProcessor):
    """Timestamps every generation step, so decode speed excludes the prompt's prefill.

    `generate` calls its logits processors once per new token, right after the forward that produced it: the
    first call follows the prefill, each later call one single-token decode forward. The span from the first to
    the last call therefore covers exactly `new_tokens - 1` decode forwards. It leaves the scores untouched.
    """

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores

    def reset(self) -> None:
        self.stamps.clear()

    def decode_span(self) -> tuple[int, float]:
        """(decode forwards, seconds) of the last `generate` call."""
        if len(self.stamps) < 2:
            raise ValueError("Decode timing needs at least 2 new tokens per generate call.")
        return len(self.stamps) - 1, self.stamps[-1] - self.stamps[0]
