"""Every expert against its naive twin (outputs and gradients), causality, registry contract."""

import pytest
import torch

from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import (
    SEED_COSTS,
    AttentionExpert,
    build_expert,
    cost_vector,
    expert_flops,
    expert_names,
    register_expert,
    unregister_expert,
)
from bayes_router.models.experts.base import block_layout

SHAPES = [(1, 1), (2, 7), (2, 16), (1, 17), (2, 24), (1, 37)]  # (B, T): T=1, odd lengths,
# multiples of the chunk; with chunk 8, T > 16 runs the prefix sums, T <= 16 the quadratic form


def _qkv(B, T, H=2, d=4, requires_grad=False):
    return [torch.randn(B, H, T, d, dtype=torch.float64, requires_grad=requires_grad)
            for _ in range(3)]


def _assert_matches_naive(expert, q, k, v, positions=None):
    """``expert(q, k, v[, positions])`` against its naive twin (the twin's rows at
    ``positions``): outputs, and when the inputs require grad, their gradients for an uneven
    upstream gradient (float64: 1e-10 and 1e-9). Returns the twin's output."""
    out = expert(q, k, v) if positions is None else expert(q, k, v, positions)
    ref = expert.naive(q, k, v)
    if positions is not None:
        B, H, _, d = q.shape
        ref = ref.gather(2, positions[:, None, :, None].expand(B, H, positions.shape[1], d))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if q.requires_grad:
        upstream = torch.randn_like(out)
        for g, r in zip(torch.autograd.grad(out, (q, k, v), upstream, retain_graph=True),
                        torch.autograd.grad(ref, (q, k, v), upstream, retain_graph=True),
                        strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    return ref


@pytest.mark.parametrize("name", ["full", "linear", "local"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T", SHAPES)
def test_expert_matches_naive_twin(name, causal, B, T):
    expert = build_expert(name, TinyLMConfig(window=3, chunk_size=8, causal=causal))
    _assert_matches_naive(expert, *_qkv(B, T, requires_grad=True))


@pytest.mark.parametrize("name", ["full", "linear", "local"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk_size", [8, 32], ids=["prefix-sums", "quadratic"])
def test_gathered_rows_match_dense_rows(name, causal, chunk_size, monkeypatch):
    import bayes_router.models.experts.base as experts_base

    monkeypatch.setattr(experts_base, "ROW_TILE", 5)  # several tiles, a ragged last one
    expert = build_expert(name, TinyLMConfig(window=4, chunk_size=chunk_size, causal=causal))
    B, T = 2, 45
    q, k, v = _qkv(B, T, requires_grad=True)
    positions = torch.stack([torch.randperm(T)[:17].sort().values for _ in range(B)])
    _assert_matches_naive(expert, q, k, v, positions)


@pytest.mark.parametrize("name", ["full", "linear", "local"])
def test_causal_experts_ignore_future(name):
    expert = build_expert(name, TinyLMConfig(window=3, chunk_size=4))
    q, k, v = _qkv(2, 23)
    t = 11
    out = expert(q, k, v)
    q2, k2, v2 = (a.clone() for a in (q, k, v))
    for a in (q2, k2, v2):
        a[:, :, t:] = torch.randn_like(a[:, :, t:]) * 10
    out2 = expert(q2, k2, v2)
    assert (out[:, :, :t] - out2[:, :, :t]).abs().max() < 1e-6
    assert (out[:, :, t:] - out2[:, :, t:]).abs().max() > 1e-3  # the perturbation is visible


def test_local_window_is_exact_size():
    """Token t sees exactly [t - w, t]: changing key t - w - 1 leaves it unchanged, t - w not."""
    w, t = 3, 10
    expert = build_expert("local", TinyLMConfig(window=w))
    q, k, v = _qkv(1, 16)
    base = expert(q, k, v)[:, :, t]
    for position, changes in ((t - w - 1, False), (t - w, True)):
        v2 = v.clone()
        v2[:, :, position] += 1.0
        moved = (expert(q, k, v2)[:, :, t] - base).abs().max() > 1e-8
        assert bool(moved) == changes


@pytest.mark.parametrize("name", expert_names())
def test_registered_experts_share_one_signature(name):
    expert = build_expert(name, TinyLMConfig(window=2, chunk_size=4))
    assert isinstance(expert, AttentionExpert)
    q, k, v = _qkv(2, 9)
    assert expert(q, k, v).shape == q.shape
    positions = torch.tensor([[0, 4, 8], [1, 2, 3]])
    assert expert(q, k, v, positions).shape == (2, 2, 3, 4)
    assert expert.flops_per_token(9, 8, 2) > 0
    torch.testing.assert_close(expert(q, k, v), expert.naive(q, k, v))


def test_user_registered_expert_with_fixed_cost():
    class MeanAttention(AttentionExpert):
        name = "mean"

        def forward(self, q, k, v, positions=None):
            out = v.cumsum(2) / torch.arange(1, v.shape[2] + 1, dtype=v.dtype)[:, None]
            if positions is not None:
                out = out.gather(2, positions[:, None, :, None].expand(*out.shape[:2],
                                                                      positions.shape[1],
                                                                      out.shape[-1]))
            return out

        def flops_per_token(self, seq_len, d_model, n_heads):
            return d_model

    register_expert("mean", MeanAttention, fixed_cost=0.05)
    try:
        cfg = TinyLMConfig(experts=("full", "mean"))
        assert cost_vector(cfg).tolist() == pytest.approx([1.0, 0.05])
        # a user's expert takes only what it uses (here nothing but causal)
        assert isinstance(build_expert("mean", cfg), MeanAttention)
        with pytest.raises(ValueError, match="already registered"):
            register_expert("mean", MeanAttention)
    finally:
        unregister_expert("mean")


def test_flop_model_closed_forms():
    """Useful FLOPs for every expert (the keys a query attends, counted position by position
    here), executed FLOPs beside them."""
    cfg = TinyLMConfig(d_model=64, n_heads=4, window=8, chunk_size=16, max_seq_len=100)
    flops = expert_flops(cfg)
    T, w = 100, 8
    assert flops["full"] == pytest.approx(4 * 64 * sum(t + 1 for t in range(T)) / T)
    assert flops["local"] == pytest.approx(4 * 64 * sum(min(t + 1, w + 1) for t in range(T)) / T)
    assert flops["linear"] == pytest.approx(4 * 64 * 16)
    two_sided = TinyLMConfig(d_model=64, n_heads=4, window=8, max_seq_len=100, causal=False)
    keys = sum(min(t, w) + min(T - 1 - t, w) + 1 for t in range(T)) / T
    assert expert_flops(two_sided)["local"] == pytest.approx(4 * 64 * keys)
    assert expert_flops(two_sided)["full"] == pytest.approx(4 * 64 * T)
    local, linear = build_expert("local", cfg), build_expert("linear", cfg)
    assert local.executed_flops_per_token(T, 64, 4) == pytest.approx(4 * 64 * 16)
    assert linear.executed_flops_per_token(T, 64, 4) == pytest.approx(4 * 64 * 16 + 4 * 64 * 16)
    # two chunks or fewer: the quadratic form scores every key
    short = build_expert("linear", TinyLMConfig(chunk_size=64))
    assert short.executed_flops_per_token(100, 64, 4) == pytest.approx(4 * 64 * 100)
    assert build_expert("full", cfg).executed_flops_per_token(T, 64, 4) == flops["full"]
    with_proj = expert_flops(cfg, include_projections=True)
    assert with_proj["full"] - flops["full"] == pytest.approx(8 * 64 * 64)
    costs = cost_vector(cfg)
    assert costs[0] == 1.0 and (costs[1:] < 1).all()
    # at long T the linear and local experts become relatively cheaper
    assert (cost_vector(cfg, seq_len=4096)[1:] < costs[1:]).all()


def test_seed_preset():
    cfg = TinyLMConfig(cost_preset="seed")
    assert cost_vector(cfg).tolist() == pytest.approx([SEED_COSTS[n] for n in cfg.experts])
    assert cost_vector(cfg).tolist() == pytest.approx([1.0, 0.15, 0.30])


@pytest.mark.parametrize("field,value,match", [
    ("window", 0, "window"),
    ("n_heads", 3, "n_heads must divide d_model"),
    ("experts", ("full", "nope"), "unknown"),
    ("cost_preset", "cheap", "cost_preset"),
    ("max_seq_len", 1, "max_seq_len"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        TinyLMConfig(**{field: value})


@pytest.mark.parametrize("name", ["linear", "local"])
def test_padding_rows_do_not_widen_the_block_layout(name):
    """Uneven rows are padded by repeating a position; repeats share a slot (no O(T^2) blow-up)
    and still get the right output."""
    positions = torch.tensor([list(range(40)), [5] * 40])  # row 1: one token, 39 repeats
    _, _, M = block_layout(positions, 8, 5, 40)
    assert M == 8  # a block holds at most 8 distinct positions
    expert = build_expert(name, TinyLMConfig(window=8, chunk_size=8))
    _assert_matches_naive(expert, *_qkv(2, 40), positions)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, window", [(45, 4), (2, 5), (9, 9)])
def test_local_kernel_in_many_tiles_matches_naive(causal, T, window, monkeypatch):
    """The dense local kernel tiles (batch, head) rows: one row per tile here, with a window
    longer than the sequence and one equal to it; outputs and its own backward against the
    naive twin."""
    import bayes_router.models.experts.local as local

    monkeypatch.setattr(local, "SCORE_TILE", 1)
    expert = build_expert("local", TinyLMConfig(window=window, max_seq_len=64, causal=causal))
    q, k, v = _qkv(3, T, requires_grad=True)
    ref = _assert_matches_naive(expert, q, k, v)
    with torch.no_grad():  # the inference path saves nothing and gives the same numbers
        torch.testing.assert_close(expert(q, k, v), ref, rtol=1e-10, atol=1e-10)


def test_local_kernel_gradient_only_for_what_needs_it():
    expert = build_expert("local", TinyLMConfig(window=3))
    q, k, v = _qkv(2, 11)
    k.requires_grad_()
    (g,) = torch.autograd.grad(expert(q, k, v).sum(), (k,))
    (r,) = torch.autograd.grad(expert.naive(q, k, v).sum(), (k,))
    torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [True, False])
def test_local_kernel_takes_permuted_and_transposed_inputs(causal):
    """Heads that are views of another layout (channels-last after a permute, a transpose) give
    the naive twin's outputs and gradients too."""
    expert = build_expert("local", TinyLMConfig(window=3, causal=causal))
    B, H, T, d = 1, 2, 13, 4
    permuted = [torch.randn(B, T, d, H, dtype=torch.float64).permute(0, 3, 1, 2)
                .requires_grad_() for _ in range(3)]
    transposed = [torch.randn(B, T, H, d, dtype=torch.float64).transpose(1, 2)
                  .requires_grad_() for _ in range(3)]
    for q, k, v in (permuted, transposed):
        _assert_matches_naive(expert, q, k, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 5, 13, 37])
@pytest.mark.parametrize("window, block", [(4, 2), (4, 1), (6, 3), (6, 2), (8, 4)])
def test_local_kernel_with_blocks_smaller_than_the_window(causal, T, window, block, monkeypatch):
    """Blocks of ``P < w`` queries (windows of ``P + w`` keys, ``P + 2w`` bidirectional, the
    layout of ``w >= 64``): outputs and the kernel's own backward against the naive twin, in
    one tile and in many; with permuted inputs too."""
    import bayes_router.models.experts.local as local

    expert = build_expert("local", TinyLMConfig(window=window, max_seq_len=64, causal=causal))
    monkeypatch.setattr(expert, "block_size", lambda: block)
    q, k, v = _qkv(2, T, requires_grad=True)
    _assert_matches_naive(expert, q, k, v)
    monkeypatch.setattr(local, "SCORE_TILE", 1)
    _assert_matches_naive(expert, q, k, v)
    permuted = [torch.randn(2, T, 4, 2, dtype=torch.float64).permute(0, 3, 1, 2)
                .requires_grad_() for _ in range(3)]
    _assert_matches_naive(expert, *permuted)


@pytest.mark.parametrize("causal", [True, False])
def test_local_kernel_halves_its_blocks_from_a_window_of_64(causal):
    """The default layout at ``w = 64`` (blocks of 32) against the naive twin, and the executed
    FLOPs it reports (``P + w`` keys, ``P + 2w`` bidirectional)."""
    from bayes_router.models.experts.local import HALF_BLOCKS_FROM

    expert = build_expert("local", TinyLMConfig(window=64, max_seq_len=256, causal=causal))
    assert HALF_BLOCKS_FROM == 64 and expert.block_size() == 32
    assert build_expert("local", TinyLMConfig(window=63)).block_size() == 63
    assert build_expert("local", TinyLMConfig(window=32)).block_size() == 32
    q, k, v = _qkv(1, 150, d=2, requires_grad=True)
    _assert_matches_naive(expert, q, k, v)
    keys = 32 + (64 if causal else 128)
    assert expert.executed_flops_per_token(150, 8, 2) == 4.0 * 8 * keys


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window, block", [(4, 4), (4, 2), (64, 32)])
def test_local_kernel_keeps_sequences_apart(causal, window, block, monkeypatch):
    """The kernel lays every (batch, head) sequence back to back and its windows reach into the
    neighbouring sequence's rows, masked out: each sequence's outputs and gradients must equal
    those of that sequence computed alone."""
    expert = build_expert("local", TinyLMConfig(window=window, max_seq_len=128, causal=causal))
    monkeypatch.setattr(expert, "block_size", lambda: block)
    q, k, v = _qkv(3, 37 if window < 64 else 100, requires_grad=True)
    cotangent = torch.randn_like(q)
    together = expert(q, k, v)
    grads = torch.autograd.grad(together, (q, k, v), cotangent)
    for b in range(3):
        alone = [t[b:b + 1].detach().requires_grad_() for t in (q, k, v)]
        out = expert(*alone)
        torch.testing.assert_close(together[b:b + 1], out, rtol=1e-12, atol=1e-12)
        for g, a in zip(grads, torch.autograd.grad(out, alone, cotangent[b:b + 1]),
                        strict=True):
            torch.testing.assert_close(g[b:b + 1], a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dense_from", [0.0, 1.0], ids=["dense-and-gather", "row-blocks"])
@pytest.mark.parametrize("window, block", [(4, 4), (4, 2), (6, 3)])
def test_local_rows_by_either_path_match_naive(causal, dense_from, window, block, monkeypatch):
    """Hard-routed rows of ``local`` come from the row-block layout, or from the dense kernel
    and a gather where blocks are full enough: both against the naive twin, outputs and
    gradients, with repeated (padding) positions and a sequence with a single row."""
    import bayes_router.models.experts.local as local

    monkeypatch.setattr(local, "DENSE_ROWS_FROM", dense_from)
    expert = build_expert("local", TinyLMConfig(window=window, max_seq_len=64, causal=causal))
    monkeypatch.setattr(expert, "block_size", lambda: block)
    B, T = 2, 29
    q, k, v = _qkv(B, T, requires_grad=True)
    positions = torch.stack([torch.randperm(T)[:11].sort().values,
                             torch.tensor([7] * 11)])  # row 1: one token, then padding
    _assert_matches_naive(expert, q, k, v, positions)


@pytest.mark.parametrize("name", ["full", "linear"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dense_from", [0.0, 1.0], ids=["dense-and-gather", "row-tiles"])
def test_full_and_linear_rows_by_either_path_match_naive(name, causal, dense_from, monkeypatch):
    """Most of a sequence's rows come from the dense kernel and a gather (causal ``full`` on
    long sequences, causal ``linear`` on the prefix sums), fewer from the row tiles or chunk
    layout: both against the naive twin, outputs and gradients, with repeated (padding)
    positions; the path asked for is the path taken."""
    import bayes_router.models.experts.full as full
    import bayes_router.models.experts.linear as linear

    module = full if name == "full" else linear
    monkeypatch.setattr(module, "DENSE_ROWS_FROM", dense_from)
    monkeypatch.setattr(full, "DENSE_ROWS_MIN_LEN", 0)
    if causal and dense_from == 0.0:  # the sparse layout must not run
        def refuse(*args, **kwargs):
            raise AssertionError("the sparse rows path ran")
        monkeypatch.setattr(module, "row_tiles" if name == "full" else "block_layout", refuse)
    expert = build_expert(name, TinyLMConfig(window=4, chunk_size=8, causal=causal))
    B, T = 2, 45
    q, k, v = _qkv(B, T, requires_grad=True)
    positions = torch.stack([torch.randperm(T)[:30].sort().values,
                             torch.cat([torch.arange(3, 32, 2), torch.full((15,), 31)])])
    _assert_matches_naive(expert, q, k, v, positions)


@pytest.mark.parametrize("T", [7, 9, 12])
def test_linear_prefix_sums_backward_passes_gradcheck(T):
    """The chunked prefix sums' own backward (chunks of 3: T > 2 chunks) against finite
    differences, T a multiple of the chunk or not."""
    from bayes_router.models.experts.linear import _ChunkedLinear

    q, k, v = _qkv(2, T, d=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: _ChunkedLinear.apply(q, k, v, 3, 1e-6),
                                    (q, k, v), eps=1e-6, atol=1e-7)


def test_linear_quadratic_form_only_while_its_scores_stay_small(monkeypatch):
    """Two chunks or fewer run the masked ``T x T`` form only while the batch's scores hold at
    most ``QUADRATIC_SCORES`` entries (a large batch of short sequences runs the prefix sums,
    the faster there), dense and gathered rows alike, and the executed FLOPs follow."""
    from bayes_router.models.experts import linear as linear_module

    expert = build_expert("linear", TinyLMConfig(chunk_size=64))
    limit = linear_module.QUADRATIC_SCORES
    assert expert.quadratic(128, limit // 128) and not expert.quadratic(128, limit // 128 + 1)
    assert not expert.quadratic(129)  # three chunks
    assert expert.executed_flops_per_token(128, 64, 4, batch=2) == pytest.approx(4 * 64 * 128)
    assert expert.executed_flops_per_token(128, 64, 4, batch=16) == pytest.approx(
        4 * 64 * 16 + 4 * 64 * 64)
    calls = {"n": 0}
    real = linear_module._ChunkedLinear.apply

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(linear_module._ChunkedLinear, "apply", counted)
    small = build_expert("linear", TinyLMConfig(chunk_size=8))
    q, k, v = _qkv(2, 16, requires_grad=True)  # two chunks, 2 * 2 * 16 * 16 = 1024 scores
    rows = torch.tensor([[0, 5, 9, 15], [3, 4, 12, 12]])  # a repeat, as padding repeats
    for limit, chunked in ((1024, 0), (1023, 1)):
        monkeypatch.setattr(linear_module, "QUADRATIC_SCORES", limit)
        calls["n"] = 0
        out = small(q, k, v)
        assert calls["n"] == chunked
        torch.testing.assert_close(out, small.naive(q, k, v), rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref = torch.autograd.grad(small.naive(q, k, v).square().sum(), (q, k, v))
        for g, r in zip(grads, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    quadratic_calls = {"n": 0}
    real_quadratic = small._quadratic

    def counted_quadratic(*args):
        quadratic_calls["n"] += 1
        return real_quadratic(*args)

    monkeypatch.setattr(small, "_quadratic", counted_quadratic)
    expected = small.naive(q, k, v).gather(2, rows[:, None, :, None].expand(2, 2, 4, 4))
    upstream = torch.randn_like(expected)
    ref = torch.autograd.grad(expected, (q, k, v), upstream)
    for limit, quadratic in ((2 * 2 * 4 * 16, 1), (2 * 2 * 4 * 16 - 1, 0)):  # rows x T scores
        monkeypatch.setattr(linear_module, "QUADRATIC_SCORES", limit)
        quadratic_calls["n"] = 0
        gathered = small(q, k, v, rows)
        torch.testing.assert_close(gathered, expected, rtol=1e-10, atol=1e-10)
        assert quadratic_calls["n"] == quadratic
        for g, r in zip(torch.autograd.grad(gathered, (q, k, v), upstream), ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("wrt", [(0,), (1,), (2,), (0, 2)])
def test_linear_prefix_sums_gradient_only_for_what_needs_it(wrt):
    expert = build_expert("linear", TinyLMConfig(chunk_size=4))
    q, k, v = _qkv(2, 19)
    inputs = [q, k, v]
    for i in wrt:
        inputs[i].requires_grad_()
    chosen = [inputs[i] for i in wrt]
    upstream = torch.randn(2, 2, 19, 4, dtype=torch.float64)
    got = torch.autograd.grad(expert(*inputs), chosen, upstream)
    ref = torch.autograd.grad(expert.naive(*inputs), chosen, upstream)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(expert(q, k, v), expert.naive(q, k, v), rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_local_kernel_keeps_sequences_apart_when_products_overflow(causal):
    """Finite float16 inputs whose products with a neighbouring sequence's rows overflow
    (65504): the masked entries must not turn into NaN (inf - inf) in that sequence, forward
    (huge keys next door) or backward (huge values next door, a loss-scaled gradient)."""
    expert = build_expert("local", TinyLMConfig(window=4, max_seq_len=16, causal=causal))
    q, k, v = (torch.randn(1, 3, 8, 16) for _ in range(3))
    q[:, 0], q[:, 2] = 0.0, 0.0
    k[:, 0], k[:, 2] = 60000.0, 60000.0  # heads 0 and 2: finite keys, q.k overflows float16
    q, k, v = (t.half() for t in (q, k, v))
    alone = expert(q[:, 1:2], k[:, 1:2], v[:, 1:2])
    together = expert(q, k, v)[:, 1:2]
    assert bool(torch.isfinite(together).all())
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    q, k, v = (torch.randn(1, 3, 8, 16) for _ in range(3))
    v[:, 0], v[:, 2] = 3000.0, 3000.0  # go . v overflows float16 for head 1's gradient
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    upstream = torch.zeros(1, 3, 8, 16, dtype=torch.half)
    upstream[:, 1] = 1000.0
    grads = torch.autograd.grad(expert(q, k, v), (q, k, v), upstream)
    own = [t[:, 1:2].detach().requires_grad_() for t in (q, k, v)]
    reference = torch.autograd.grad(expert(*own), own, upstream[:, 1:2])
    for g, r in zip(grads, reference, strict=True):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g[:, 1:2], r, rtol=0, atol=0)


@pytest.mark.parametrize("name, T", [("local", 37), ("linear", 37), ("linear", 12)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_run_their_backward_under_autocast(name, T, dtype):
    """Forward and backward both inside ``torch.autocast`` (a training loop may call backward
    there) on float32 heads: the kernels keep the dtype they computed in, and give the
    gradients of the same computation outside autocast."""
    expert = build_expert(name, TinyLMConfig(window=4, chunk_size=4, max_seq_len=64))
    q, k, v = (torch.randn(2, 2, T, 8, requires_grad=True) for _ in range(3))
    upstream = torch.randn(2, 2, T, 8)
    with torch.autocast("cpu", dtype=dtype):
        inside = torch.autograd.grad(expert(q, k, v), (q, k, v), upstream)
    outside = torch.autograd.grad(expert(q, k, v), (q, k, v), upstream)
    for g, r in zip(inside, outside, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("name", ["full", "linear", "local"])
@pytest.mark.parametrize("causal", [True, False])
def test_an_empty_sequence_gives_an_empty_output(name, causal):
    """T = 0, and rows asked of none of a sequence's positions: empty outputs, no error."""
    expert = build_expert(name, TinyLMConfig(window=4, chunk_size=4, causal=causal))
    q, k, v = _qkv(2, 0, requires_grad=True)
    out = expert(q, k, v)
    assert out.shape == (2, 2, 0, 4)
    assert expert(q, k, v, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 2, 0, 4)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or g.shape == (2, 2, 0, 4) for g in grads)
    q, k, v = _qkv(2, 20)  # a sequence (linear: the prefix sums), no rows asked for
    assert expert(q, k, v, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 2, 0, 4)


@pytest.mark.parametrize("rows, front, back, scale", [(7, 0, 0, None), (9, 3, 2, 0.5),
                                                       (7, 0, 0, 2.0), (8, 4, 0, None)])
def test_pad_rows_lays_sequences_back_to_back(rows, front, back, scale):
    """``pad_rows`` against ``F.pad`` and a concatenation, for permuted inputs too; a view of the
    input where nothing is to pad or scale; gradients through the scaled copy."""
    import torch.nn.functional as F

    from bayes_router.models.experts.base import pad_rows

    x = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    for inp in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
        body = F.pad(inp * (1.0 if scale is None else scale), (0, 0, 0, rows - 7))
        expected = torch.cat([torch.zeros(front, 4, dtype=x.dtype), body.reshape(-1, 4),
                              torch.zeros(back, 4, dtype=x.dtype)])
        torch.testing.assert_close(pad_rows(inp, rows, front, back, scale), expected,
                                   rtol=0, atol=0)
    if (rows, front, back, scale) == (7, 0, 0, None):
        assert pad_rows(x, 7).data_ptr() == x.data_ptr()
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(pad_rows(leaf, rows, front, back, scale).sum(), leaf)
    torch.testing.assert_close(g, torch.full_like(x, 1.0 if scale is None else scale))
