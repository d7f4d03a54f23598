"""Interleaved timing: round-robin calls, warm-up excluded, medians of the rounds."""

import pytest

from bayes_router.core.clock import interleaved_times, median_times


def test_functions_are_called_round_robin_after_the_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = interleaved_times(fns, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert {label: len(t) for label, t in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for values in times.values() for t in values)


def test_median_times_and_bad_counts():
    assert set(median_times({"x": lambda: None}, repeats=1, warmup=0)) == {"x"}
    with pytest.raises(ValueError, match="repeats"):
        interleaved_times({"x": lambda: None}, repeats=0)
