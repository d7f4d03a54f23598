"""The public tensor boundary: experts, RoutedAttention, FixedRouting and TinyLMConfig refuse
bad input with a ValueError naming it, instead of failing deep inside torch or returning NaN."""

import math

import pyro
import pyro.poutine as poutine
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


@pytest.mark.parametrize("router", ["bayesian", "prior-free"])
def test_token_ids_are_checked_once_where_they_enter(router, monkeypatch):
    """TinyLM.check_tokens is the one rule of token ids: the Pyro model and guide apply it to x
    and y on entry and their LM pass trusts x; predict applies it through the LM's forward."""
    from bayes_router.models.bayesian import BayesianRoutedLM
    from bayes_router.models.prior_free import PriorFreeRoutedLM

    with pyro.settings.context(module_local_params=True):
        model = BayesianRoutedLM(CFG) if router == "bayesian" else PriorFreeRoutedLM(CFG)
    x, y = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    checked = []
    original = TinyLM.check_tokens
    monkeypatch.setattr(TinyLM, "check_tokens",
                        lambda self, t, name="x": (checked.append(name), original(self, t, name)))
    guide_trace = poutine.trace(model.guide).get_trace(x, y)
    assert checked == ["x", "y"]
    if router == "bayesian":
        model.clear_cache()  # the model then runs the LM itself
    poutine.replay(model.model, trace=guide_trace)(x, y)
    assert checked == ["x", "y"] * 2
    model.predict(x)
    assert checked == ["x", "y"] * 2 + ["x"]
    for bad, error, match in [
        (y.float(), TypeError, "y must be an integer tensor of token ids, got torch.float32"),
        (y[0], ValueError, r"y must have shape \(B, T\), got \(8,\)"),
        (torch.full_like(y, 11), ValueError, r"y holds token ids outside \[0, 11\)"),
        (y[:, :5], ValueError, r"x and y must have the same shape, got \(2, 8\) and \(2, 5\)"),
    ]:
        for program in (model.model, model.guide):
            with pytest.raises(error, match=match):
                program(x, bad)
    with pytest.raises(ValueError, match="x has T=20 > max_seq_len=16"):
        model.guide(torch.zeros(1, 20, dtype=torch.long))


def test_routed_lm_settings_are_refused_with_one_wording():
    """A gate threshold out of [0, 1] reads the same from the Pyro pair and from routing_weights
    (router.check_gate_threshold); costs must be positive and finite wherever a routed LM is
    built; tau shares the configuration's rule (core.validation.check_positive)."""
    from bayes_router.models.prior_free import PriorFreeRoutedLM
    from bayes_router.models.router import RoutingDecision, routing_weights

    with pyro.settings.context(module_local_params=True):
        model = PriorFreeRoutedLM(CFG)
        x = torch.randint(0, 11, (2, 8))
        message = r"gate_threshold must be in \[0, 1\] \(normalised entropy\), got 1.5"
        with pytest.raises(ValueError, match=message):
            model.model(x, gate_threshold=1.5)
        w = torch.full((2, 8, 3), 1 / 3)
        with pytest.raises(ValueError, match=message):
            routing_weights(RoutingDecision(w, w, torch.zeros(2, 8)), "gated", 1.5)
        with pytest.raises(ValueError, match="costs must hold 3 positive finite values"):
            PriorFreeRoutedLM(CFG, costs=torch.tensor([1.0, math.inf, 0.3]))
        with pytest.raises(ValueError, match="tau must be a finite number > 0, got 0"):
            PriorFreeRoutedLM(CFG, tau=0)
