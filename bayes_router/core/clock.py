"""Wall-clock timing of several functions, interleaved (a leaf module).

The functions are timed round-robin, one call of each per round after ``warmup`` rounds, so a
slow spell of a shared machine hits them alike and the ratios between them stay fair. Every
timing in the package (the benchmark, the timed hard pass of an evaluation, the SVI step
comparison) goes through :func:`interleaved_times`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved_times(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
                      ) -> dict[str, list[float]]:
    """Wall-clock seconds of each ``fns[label]()`` in each of ``repeats`` rounds.

    :raises ValueError: if ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return times


def median_times(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
                 ) -> dict[str, float]:
    """Median of :func:`interleaved_times` for each label."""
    return {label: statistics.median(t)
            for label, t in interleaved_times(fns, repeats, warmup).items()}
