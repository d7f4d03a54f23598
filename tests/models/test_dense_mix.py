"""The shared softmax attention of short hard-routed sequences against the per-expert paths
and the naive twins: outputs and gradients, causal and bidirectional, odd lengths, T=1."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bayes_router.models import router as router_module
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.dense_mix import row_masks, shared_softmax, softmax_experts
from bayes_router.models.experts import build_expert
from bayes_router.models.router import RoutedAttention

CFG = TinyLMConfig(d_model=16, n_heads=2, window=3, chunk_size=4, max_seq_len=64)


def _count_calls(monkeypatch) -> dict:
    calls = {"n": 0}
    real = router_module.shared_softmax

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(router_module, "shared_softmax", counted)
    return calls


def _index(B, T, shares, generator):
    labels = torch.multinomial(torch.tensor(shares), B * T, replacement=True,
                               generator=generator)
    return labels.view(B, T)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("shares", [(0.3, 0.4, 0.3), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5)],
                         ids=["all three", "softmax experts only", "local and linear"])
def test_shared_softmax_layer_equals_the_per_expert_paths(causal, T, shares, monkeypatch):
    generator = torch.Generator().manual_seed(T)
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, causal=causal)
    layer = RoutedAttention(cfg).double()
    per_expert = RoutedAttention(dataclasses.replace(cfg, dense_hard_max_len=0)).double()
    per_expert.load_state_dict(layer.state_dict())
    index = _index(2, T, shares, generator)
    index[0, 0], index[1, 0] = 0 if shares[0] else 2, 1 if shares[1] else 2  # two experts used
    weights = F.one_hot(index, 3).double() * 0.8  # a weight other than 1 scales the row
    x = torch.randn(2, T, 16, dtype=torch.float64, requires_grad=True)
    calls = _count_calls(monkeypatch)
    fast = layer(x, weights, sparse=True)
    assert calls["n"] == 1
    for reference in (per_expert(x, weights, sparse=True), layer(x, weights, sparse=False)):
        torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(fast)
    wrt = [x, *layer.parameters()]
    fast_grads = torch.autograd.grad(fast, wrt, cotangent, allow_unused=True)
    ref_grads = torch.autograd.grad(layer(x, weights, sparse=False), wrt, cotangent,
                                    allow_unused=True)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("causal", [True, False])
def test_shared_softmax_rows_match_each_experts_naive_twin(causal):
    cfg = dataclasses.replace(CFG, causal=causal)
    experts = [build_expert(name, cfg) for name in cfg.experts]
    B, H, T, d = 2, 2, 19, 4
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    index = _index(B, T, (0.4, 0.2, 0.4), torch.Generator().manual_seed(1))
    shared = softmax_experts(experts)
    assert [experts[e].name for e in shared] == ["full", "local"]
    out = shared_softmax(q, k, v, index, row_masks(experts, T, q.dtype, q.device), shared)
    for e, expert in enumerate(experts):
        rows = (index == e)[:, None, :, None]
        expected = expert.naive(q, k, v) if e in shared else torch.zeros_like(out)
        torch.testing.assert_close(torch.where(rows, out, 0.0), torch.where(rows, expected, 0.0),
                                   rtol=1e-12, atol=1e-12)


def test_the_shared_path_applies_only_to_short_one_hot_rows(monkeypatch):
    layer = RoutedAttention(dataclasses.replace(CFG, dense_hard_max_len=16))
    calls = _count_calls(monkeypatch)
    index = torch.tensor([[0, 2, 1, 0] * 4])
    one_hot = F.one_hot(index, 3).float()
    layer(torch.randn(1, 16, 16), one_hot, sparse=True)
    assert calls["n"] == 1
    layer(torch.randn(1, 17, 16), F.one_hot(torch.tensor([[0, 2] * 8 + [1]]), 3).float(),
          sparse=True)  # longer than dense_hard_max_len
    soft_row = one_hot.clone()
    soft_row[0, 3] = torch.tensor([0.5, 0.0, 0.5])  # gated: one row is soft
    layer(torch.randn(1, 16, 16), soft_row, sparse=True)
    local_only = F.one_hot(torch.full((1, 16), 2), 3).float()  # one expert: its own path
    layer(torch.randn(1, 16, 16), local_only, sparse=True)
    layer(torch.randn(1, 16, 16), one_hot, sparse=False)  # soft routing
    assert calls["n"] == 1


def test_softmax_keys_are_the_naive_masks():
    T = 9
    full, linear, local = (build_expert(name, CFG) for name in CFG.experts)
    offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    assert torch.equal(full.softmax_keys(T), offset <= 0)
    assert torch.equal(local.softmax_keys(T), (offset <= 0) & (offset >= -CFG.window))
    assert linear.softmax_keys(T) is None


@pytest.mark.parametrize("value", [-1, 1.5, True, "256"])
def test_dense_hard_max_len_is_checked(value):
    with pytest.raises(ValueError, match="dense_hard_max_len must be an integer >= 0"):
        TinyLMConfig(dense_hard_max_len=value)


def test_the_row_mask_cache_keeps_the_last_few_lengths():
    layer = RoutedAttention(CFG)
    for T in range(4, 16):
        one_hot = F.one_hot(torch.arange(T).remainder(3)[None], 3).float()
        layer(torch.randn(1, T, 16), one_hot, sparse=True)
    assert [key[0] for key in layer._row_masks] == list(range(16 - router_module.ROW_MASK_CACHE,
                                                              16))
