"""RoutedAttention: hard == soft with one-hot weights, sparse rows, controller features."""

import pytest
import torch
import torch.nn.functional as F

from bayes_router.models.config import TinyLMConfig
from bayes_router.models.controller import controller_features
from bayes_router.models.router import (
    RoutedAttention,
    RoutingDecision,
    routing_weights,
    selected_positions,
)

CFG = TinyLMConfig(d_model=16, n_heads=2, window=3, chunk_size=4, max_seq_len=32)


@pytest.mark.parametrize("shared_qkv", [True, False])
@pytest.mark.parametrize("T", [1, 13])
@pytest.mark.parametrize("dense_hard_max_len", [0, 256], ids=["sparse", "shared-softmax"])
def test_hard_equals_soft_with_one_hot(shared_qkv, T, dense_hard_max_len):
    cfg = TinyLMConfig(**{**CFG.to_dict(), "shared_qkv": shared_qkv,
                          "dense_hard_max_len": dense_hard_max_len})
    layer = RoutedAttention(cfg).double()
    x = torch.randn(2, T, 16, dtype=torch.float64)
    one_hot = F.one_hot(torch.randint(0, 3, (2, T)), 3).double()
    soft = layer(x, one_hot, sparse=False)
    hard = layer(x, one_hot, sparse=True)
    torch.testing.assert_close(hard, soft, rtol=1e-10, atol=1e-10)
    g_soft = torch.autograd.grad(soft.square().sum(), list(layer.parameters()), allow_unused=True)
    g_hard = torch.autograd.grad(hard.square().sum(), list(layer.parameters()), allow_unused=True)
    for a, b in zip(g_soft, g_hard):
        if a is None or b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_sparse_mixture_equals_dense_mixture():
    """Gated routing: some rows one-hot, some soft; sparse path == dense path."""
    layer = RoutedAttention(CFG).double()
    x = torch.randn(3, 20, 16, dtype=torch.float64)
    soft = torch.softmax(torch.randn(3, 20, 3, dtype=torch.float64), -1)
    one_hot = F.one_hot(soft.argmax(-1), 3).double()
    gate = torch.rand(3, 20) < 0.6
    weights = torch.where(gate[..., None], one_hot, soft)
    torch.testing.assert_close(layer(x, weights, sparse=True), layer(x, weights),
                               rtol=1e-10, atol=1e-10)


def test_soft_mixture_is_weighted_sum_of_experts():
    layer = RoutedAttention(CFG).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    w = torch.softmax(torch.randn(2, 9, 3, dtype=torch.float64), -1)
    single = [layer(x, F.one_hot(torch.full((2, 9), k), 3).double()) for k in range(3)]
    bias = layer.out.bias
    # the shared out projection is affine: subtract its bias before mixing
    mixed = sum(w[..., k:k + 1] * (single[k] - bias) for k in range(3)) + bias
    torch.testing.assert_close(layer(x, w), mixed, rtol=1e-10, atol=1e-10)


def test_leading_particle_dimension_broadcasts():
    layer = RoutedAttention(CFG)
    x = torch.randn(2, 7, 16)
    w = torch.softmax(torch.randn(4, 2, 7, 3), -1)
    out = layer(x, w)
    assert out.shape == (4, 2, 7, 16)
    torch.testing.assert_close(out[2], layer(x, w[2]))


def test_weights_shape_is_checked():
    layer = RoutedAttention(CFG)
    with pytest.raises(ValueError, match="weights must have shape"):
        layer(torch.randn(2, 7, 16), torch.ones(2, 7, 2))
    bad = torch.full((2, 7, 3), 1 / 3)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        layer(torch.randn(2, 7, 16), bad)


def test_selected_positions():
    selected = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    positions, valid = selected_positions(selected)
    assert positions.tolist() == [[1, 3, 4], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]


def test_controller_features_do_not_depend_on_later_tokens():
    h = torch.randn(2, 10, 16)
    full = controller_features(h, max_seq_len=32)
    prefix = controller_features(h[:, :4], max_seq_len=32)
    torch.testing.assert_close(full[:, :4], prefix)
    assert full[0, :, -1].tolist() == pytest.approx([t / 31 for t in range(10)])
    assert full[0, 3, 16].item() == pytest.approx(h[0, 3].norm().item() / 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        controller_features(torch.randn(1, 40, 16), max_seq_len=32)


def test_routing_modes():
    mean = torch.tensor([[[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]]])
    sample = torch.tensor([[[0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]])
    decision = RoutingDecision(weights=sample, mean=mean, uncertainty=torch.tensor([[0.1, 0.9]]))
    assert torch.equal(routing_weights(decision, "soft")[0], sample)
    hard, index, _ = routing_weights(decision, "hard")
    assert index.tolist() == [[1, 0]] and hard.sum(-1).eq(1).all()
    gated, index, mask = routing_weights(decision, "gated", gate_threshold=0.5)
    assert mask.tolist() == [[True, False]] and index.tolist() == [[1, -1]]
    assert gated[0, 0].tolist() == [0, 1, 0] and torch.equal(gated[0, 1], sample[0, 1])
    with pytest.raises(ValueError, match="mode must be one of"):
        routing_weights(decision, "random")
    with pytest.raises(ValueError, match="gate_threshold"):
        routing_weights(decision, "gated", gate_threshold=1.5)


@pytest.mark.parametrize("shared_qkv", [True, False])
@pytest.mark.parametrize("sparse", [True, False])
def test_tokens_with_no_weight_mix_nothing(shared_qkv, sparse):
    """A layer whose weights are zero everywhere (or on some tokens) mixes nothing there: the
    output is the shared out projection of zero (its bias), or zero with one projection per
    expert (each term is weighted), sparse or dense, with gradients."""
    cfg = TinyLMConfig(**{**CFG.to_dict(), "shared_qkv": shared_qkv})
    layer = RoutedAttention(cfg).double()
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64, requires_grad=True)
    weights = torch.zeros(2, 9, cfg.n_experts, dtype=torch.float64)
    out = layer(x, weights, sparse=sparse)
    bias = layer.out.bias if shared_qkv else torch.zeros(cfg.d_model, dtype=torch.float64)
    torch.testing.assert_close(out, bias.detach().expand_as(out))
    weights[1, 4, 0] = 1.0  # one token of one sequence on one expert
    out = layer(x, weights, sparse=sparse)
    torch.testing.assert_close(out[0], bias.detach().expand_as(out[0]))
    reference = layer(x, weights, sparse=not sparse)
    torch.testing.assert_close(out, reference)
    (g,) = torch.autograd.grad(out.sum(), x)
    (r,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(g, r)


@pytest.mark.parametrize("layer_dtype, weights_dtype",
                         [(torch.float64, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shared_qkv", [True, False])
@pytest.mark.parametrize("mix", ["softmax-experts", "all"])
def test_weights_of_another_dtype_mix_in_the_layers(layer_dtype, weights_dtype, shared_qkv,
                                                     mix):
    """Weights in another floating dtype than the layer's: every path (the shared softmax of a
    short hard-routed sequence, sparse rows, dense) mixes in the layer's dtype and equals the
    layer fed the same weights converted."""
    cfg = TinyLMConfig(**{**CFG.to_dict(), "shared_qkv": shared_qkv})
    layer = RoutedAttention(cfg).to(layer_dtype)
    x = torch.randn(2, 13, cfg.d_model, dtype=layer_dtype)
    index = torch.randint(0, cfg.n_experts, (2, 13))
    if mix == "softmax-experts":  # only full and local: the shared softmax path covers all
        index = torch.where(index == cfg.experts.index("linear"), 0, index)
    weights = F.one_hot(index, cfg.n_experts).to(weights_dtype)
    for sparse in (True, False):
        out = layer(x, weights, sparse=sparse)
        assert out.dtype == layer_dtype
        torch.testing.assert_close(out, layer(x, weights.to(layer_dtype), sparse=sparse))
