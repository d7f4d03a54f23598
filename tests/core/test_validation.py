"""``all_finite``: the cheap finiteness test behind the value checks."""

import math

import pytest
import torch

from bayes_router.core.validation import all_finite

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_tensors_pass(dtype):
    x = torch.randn(3, 5, 7).to(dtype)
    assert all_finite(x)
    assert all_finite(torch.empty(0, 4, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 17, -1])
def test_any_non_finite_entry_fails(dtype, bad, where):
    x = torch.randn(4, 9).to(dtype)
    x.view(-1)[where] = bad
    assert not all_finite(x)


def test_an_infinity_of_each_sign_fails():
    """+inf and -inf together sum to NaN, still not finite."""
    x = torch.zeros(10)
    x[2], x[7] = math.inf, -math.inf
    assert not all_finite(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_entries_whose_sum_overflows_pass(dtype):
    """The sum of large finite entries overflows to inf: the exact test must then decide."""
    big = torch.finfo(dtype).max
    x = torch.full((64,), big, dtype=dtype)
    assert not bool(torch.isfinite(x.sum()))  # the case the fallback exists for
    assert all_finite(x)
    x[5] = math.nan
    assert not all_finite(x)


def test_matches_the_elementwise_test_on_random_patterns():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.randn(50, generator=g) * 10.0 ** torch.randint(0, 39, (1,), generator=g).item()
        if torch.rand(1, generator=g) < 0.5:
            i = torch.randint(0, 50, (3,), generator=g)
            bad = torch.tensor([math.nan, math.inf, -math.inf])
            x[i] = bad[torch.randint(0, 3, (3,), generator=g)]
        assert all_finite(x) == bool(torch.isfinite(x).all())
