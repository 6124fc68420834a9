"""Timers shared by every benchmark script.

:class:`Stopwatch` times one span; :func:`sample` times repeated calls after a warm-up; :func:`timed_interleaved`
times several functions in rounds, alternating which goes first, so a load change on the shared machine
mostly cancels in the per-round ratio; :class:`Summary` reports medians and that paired ratio of two sides.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

Sync = Callable[[], Any] | None  # called after each timed call, inside the span (e.g. torch.cuda.synchronize)

OURS, TV = "ours", "torchvision"  # the two sides of a paired comparison


class Stopwatch:
    """Wall-clock seconds: ``with Stopwatch() as w: ...`` then ``w.s`` (and ``w.cpu``, process CPU seconds of
    all threads); or ``w = Stopwatch()`` then ``w.elapsed()``."""

    def __init__(self) -> None:
        self.s = self.cpu = 0.0
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def __enter__(self) -> Stopwatch:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s, self.cpu = self.elapsed(), time.process_time() - self.cpu_start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def sample(fn: Callable[[], Any], repeats: int, warmup: int = 0, sync: Sync = None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def timed_interleaved(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, sync: Sync = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm up each, then ``repeats`` rounds of every function, alternating which goes first.

    Returns wall-clock and process CPU times (all threads) per function and round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if sync is not None:
        sync()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            if sync is not None:
                sync()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def inner_loop(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()

    return run


class Summary:
    """Median times of ours and torchvision (per call); ``overhead`` = median of the per-round ratios
    ours/torchvision − 1 (each round runs both back to back, so a load change on the shared machine
    mostly cancels), ``ratio_of_medians`` − 1 for comparison, and the paired overhead of process CPU time."""

    def __init__(
        self, times: tuple[dict[str, list[float]], dict[str, list[float]]], scale: float = 1.0, calls: int = 1
    ) -> None:
        wall, cpu = times
        self.calls = calls
        self.ours = [t * scale for t in wall[OURS]]
        self.tv = [t * scale for t in wall[TV]]
        self.med_ours, self.med_tv = statistics.median(self.ours), statistics.median(self.tv)
        self.delta = self.med_ours - self.med_tv
        self.ratio_of_medians = self.med_ours / self.med_tv - 1
        pairs = sorted(a / b - 1 for a, b in zip(self.ours, self.tv, strict=True))
        self.overhead = statistics.median(pairs)
        self.range = (pairs[0], pairs[-1])
        self.cpu_ours = [t * scale for t in cpu[OURS]]
        self.cpu_tv = [t * scale for t in cpu[TV]]
        self.cpu_overhead = statistics.median(a / b - 1 for a, b in zip(self.cpu_ours, self.cpu_tv, strict=True))


def per_call(fns: dict[str, Callable[[], Any]], rounds: int, round_s: float) -> Summary:
    """Time short calls: after a warm-up call, ``rounds`` interleaved rounds of n calls each, with n
    chosen so that a round of the slower function lasts about ``round_s``; time per call."""
    once = []
    for fn in fns.values():
        fn()
        t0 = time.perf_counter()
        fn()
        once.append(time.perf_counter() - t0)
    n = max(1, min(500, round(round_s / max(max(once), 1e-6))))
    return Summary(timed_interleaved({k: inner_loop(f, n) for k, f in fns.items()}, 0, rounds), 1 / n, n)


def pct(x: float) -> str:
    return f"{100 * x:+.1f} %"
