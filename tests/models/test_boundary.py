"""The public tensor boundary: experts, RoutedAttention, FixedRouting and TinyLMConfig refuse
bad input with a ValueError naming it, instead of failing deep inside torch or returning NaN."""

import math

import pytest
import torch

from bayes_router.core.validation import is_validation_enabled, validation_enabled
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import build_expert
from bayes_router.models.router import RoutedAttention
from bayes_router.models.tinylm import FixedRouting, TinyLM

CFG = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=16, window=4,
                   chunk_size=4, controller_hidden=8)
EXPERTS = list(CFG.experts)


def qkv(B=2, H=2, T=8, d=8, dtype=torch.float32):
    return [torch.randn(B, H, T, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("name", EXPERTS)
@pytest.mark.parametrize("arg", [0, 1, 2])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_experts_refuse_non_finite_inputs(name, arg, bad):
    expert = build_expert(name, CFG)
    q, k, v = qkv()
    [q, k, v][arg][0, 0, 3, 1] = bad
    with pytest.raises(ValueError, match=rf"{name} expert: {'qkv'[arg]} holds NaN or Inf"):
        expert(q, k, v)


@pytest.mark.parametrize("name", EXPERTS)
def test_the_validation_switch_turns_the_value_checks_off(name):
    expert = build_expert(name, CFG)
    q, k, v = qkv()
    q[0, 0, 0, 0] = math.nan
    assert is_validation_enabled()
    with validation_enabled(False):
        assert not is_validation_enabled()
        out = expert(q, k, v)  # no check: NaN flows through, as the user asked
    assert is_validation_enabled() and out.shape == q.shape


@pytest.mark.parametrize("name", EXPERTS)
@pytest.mark.parametrize("case, match", [
    ("3d", r"q must have shape \(B, H, T, d\)"),
    ("int", "q must be a floating tensor"),
    ("short_k", "q, k and v must have one shape"),
    ("wide_v", "q, k and v must have one shape"),
    ("mixed_dtype", "must share dtype and device"),
    ("positions_range", r"positions must lie in \[0, T=8\)"),
    ("positions_float", "positions must be an integer tensor"),
    ("positions_shape", r"positions must have shape \(B=2, R\)"),
    ("not_tensor", "q must be a tensor"),
])
def test_experts_refuse_malformed_inputs(name, case, match):
    expert = build_expert(name, CFG)
    q, k, v = qkv()
    positions = None
    if case == "3d":
        q, k, v = q[0], k[0], v[0]
    elif case == "int":
        q = q.long()
    elif case == "short_k":
        k, v = k[:, :, :5], v[:, :, :5]
    elif case == "wide_v":
        v = torch.randn(2, 2, 8, 5)
    elif case == "mixed_dtype":
        k = k.double()
    elif case == "positions_range":
        positions = torch.tensor([[0, 8], [1, 2]])
    elif case == "positions_float":
        positions = torch.tensor([[0.0, 1.0], [1.0, 2.0]])
    elif case == "positions_shape":
        positions = torch.tensor([0, 1])
    elif case == "not_tensor":
        q = q.tolist()
    with pytest.raises(ValueError, match=match):
        expert(q, k, v, positions)


def test_routed_attention_refuses_bad_input():
    layer = RoutedAttention(CFG)
    x, w = torch.randn(2, 8, 16), torch.full((2, 8, 3), 1 / 3)
    assert layer(x, w).shape == x.shape
    cases = [
        (x.double(), w, "x must have the layer's dtype torch.float32, got torch.float64"),
        (x[..., :12], w, r"x must have shape \(\.\.\., T, D=16\)"),
        (x.long(), w, "x must be a floating tensor"),
        (x, w[..., :2], r"weights must have shape \(\.\.\., T=8, K=3\)"),
        (x, -w, "weights must be finite and non-negative"),
        (x.masked_fill(torch.rand_like(x) < 0.01, math.nan), w, "x holds NaN or Inf"),
    ]
    for bad_x, bad_w, match in cases:
        with pytest.raises(ValueError, match=match):
            layer(bad_x, bad_w)


def test_fixed_routing_must_cover_every_layer():
    lm = TinyLM(CFG)
    x = torch.randint(0, 11, (2, 8))
    one_layer = FixedRouting([torch.full((2, 8, 3), 1 / 3)])
    with pytest.raises(ValueError, match="holds weights for 1 layers, asked for layer 1"):
        lm(x, one_layer)
    with pytest.raises(ValueError, match=r"weights\[0\] must be a floating"):
        FixedRouting([torch.ones(2, 8, 3, dtype=torch.long)])


@pytest.mark.parametrize("field, value, match", [
    ("window", 2.5, "window must be an integer >= 1, got 2.5"),
    ("max_seq_len", math.nan, "max_seq_len must be an integer >= 2, got nan"),
    ("window", 16, "window must be < max_seq_len"),
    ("d_model", True, "d_model must be an integer"),
    ("causal", "yes", "causal must be True or False"),
    ("experts", "full", "experts must be a sequence of expert names"),
    ("experts", ("", ""), "experts must be non-empty names"),
])
def test_model_config_types_are_checked_at_construction(field, value, match):
    with pytest.raises(ValueError, match=match):
        TinyLMConfig(**{**CFG.to_dict(), field: value})
