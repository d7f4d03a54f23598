"""Mixed precision: the experts in bfloat16/float16 against float64 naive twins, and the routing
maths kept in full precision under autocast."""

import pytest
import torch
from pyro import poutine

from bayes_router.core.precision import autocast, dtype_name, gradient_scaler, resolve_dtype
from bayes_router.models.bayesian import BayesianRoutedLM, alpha_site
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import build_expert
from bayes_router.models.prior_free import PriorFreeRoutedLM

pytestmark = pytest.mark.usefixtures("local_params")

LOW = [torch.bfloat16, torch.float16]
#: bfloat16 keeps 8 bits of mantissa, float16 11: errors relative to the outputs' scale
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("name", ["full", "linear", "local"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_name)
@pytest.mark.parametrize("rows", [False, True], ids=["dense", "rows"])
def test_low_precision_expert_matches_float64_twin(name, causal, dtype, rows):
    torch.manual_seed(0)
    expert = build_expert(name, TinyLMConfig(window=5, chunk_size=8, causal=causal))
    B, H, T, d = 2, 2, 37, 8
    exact = [torch.randn(B, H, T, d, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    low = [t.detach().to(dtype).requires_grad_() for t in exact]
    positions = torch.stack([torch.randperm(T)[:11].sort().values for _ in range(B)])
    with autocast("cpu", dtype):
        out = expert(*low, positions) if rows else expert(*low)
    ref = expert.naive(*[t.to(dtype).double() for t in exact])  # the same rounded inputs
    if rows:
        ref = ref.gather(2, positions[:, None, :, None].expand(B, H, -1, d))
    assert out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, low, upstream.to(dtype))
    ref_in = [t.detach().to(dtype).double().requires_grad_() for t in exact]
    ref = expert.naive(*ref_in)
    if rows:
        ref = ref.gather(2, positions[:, None, :, None].expand(B, H, -1, d))
    ref_grads = torch.autograd.grad(ref, ref_in, upstream)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert _relative_error(g, r) < 2 * TOLERANCE[dtype]


def test_linear_in_bfloat16_stays_accurate_over_many_chunks():
    """512 chunks of a growing prefix sum: still within bfloat16's rounding of the naive twin
    (torch accumulates bfloat16 sums in float32; measured error 1.0e-2)."""
    torch.manual_seed(1)
    expert = build_expert("linear", TinyLMConfig(chunk_size=4, max_seq_len=4096))
    q, k, v = (torch.randn(1, 1, 2048, 8, dtype=torch.float64) for _ in range(3))
    v = v.abs() + 1.0  # a growing prefix: the case where rounding the running sum hurts
    low = [t.to(torch.bfloat16) for t in (q, k, v)]
    out = expert(*low)
    ref = expert.naive(*[t.double() for t in low])
    assert _relative_error(out, ref) < 2e-2


@pytest.mark.parametrize("cls", [BayesianRoutedLM, PriorFreeRoutedLM])
def test_autocast_lm_keeps_router_and_likelihood_in_full_precision(cls):
    torch.manual_seed(0)
    cfg = TinyLMConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, max_seq_len=16,
                       window=4, chunk_size=8, controller_hidden=8)
    model = cls(cfg)
    x = torch.randint(0, 20, (3, 16))
    exact = model.predict(x)
    model.set_precision("bfloat16")
    low = model.predict(x)
    assert low.logits.dtype == torch.float32
    assert _relative_error(low.logits, exact.logits) < 3e-2
    assert (low.logits - exact.logits).abs().max() > 0  # the blocks did run in bfloat16
    # layer 0's routing depends on the embeddings only: the controller must give the very same
    # numbers as in float32 (a controller under autocast would round them to bfloat16)
    torch.testing.assert_close(low.routing[0].decision.weights, exact.routing[0].decision.weights,
                               rtol=0, atol=0)
    for layer in low.routing:
        assert layer.features.dtype == torch.float32
        assert layer.decision.weights.dtype == torch.float32


def test_autocast_guide_samples_in_float64():
    torch.manual_seed(0)
    cfg = TinyLMConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, max_seq_len=16,
                       window=4, chunk_size=8, controller_hidden=8)
    model = BayesianRoutedLM(cfg)
    model.set_precision("bfloat16")
    x = torch.randint(0, 20, (2, 16))
    trace = poutine.trace(model.guide).get_trace(x, x)
    for layer in range(cfg.n_layers):
        site = trace.nodes[alpha_site(layer)]
        assert site["value"].dtype == torch.float64
        assert site["fn"].base_dist.concentration.dtype == torch.float64


def test_dtype_names_are_checked():
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        resolve_dtype("half")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype(torch.float64)
    with pytest.raises(ValueError, match="dtype must be one of"):
        PriorFreeRoutedLM(TinyLMConfig(vocab_size=8)).set_precision("int8")
    assert gradient_scaler("cpu", torch.bfloat16) is None
    assert gradient_scaler("cpu", torch.float16) is not None


def test_the_local_kernel_keeps_its_inputs_dtype_under_another_autocast():
    """Its products write into preallocated buffers of the inputs' dtype: an autocast that
    changes an intermediate's dtype (CUDA's returns softmax in float32) must not reach them."""
    expert = build_expert("local", TinyLMConfig(window=4))
    q, k, v = (torch.randn(2, 2, 19, 8, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    with autocast("cpu", torch.bfloat16):  # bfloat16 products, float16 buffers
        out = expert(q, k, v)
    assert out.dtype == torch.float16
    ref = expert.naive(*[t.detach().double() for t in (q, k, v)])
    assert _relative_error(out, ref) < TOLERANCE[torch.float16]
    out.sum().backward()
    assert q.grad.dtype == torch.float16
