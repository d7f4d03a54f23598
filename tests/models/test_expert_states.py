"""Every expert's decoding state against its naive twin run over the whole prefix.

An expert's state after a prefill and any number of decoding steps must give, for the queries
it reads, the outputs the naive twin gives at those positions of the whole sequence: one token
at a time, in chunks, for some sequences only, and for sequences of different lengths.
"""

import pytest
import torch

from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import AttentionExpert, build_expert, expert_names
from bayes_router.models.experts.base import KVCache

WINDOW = 3


def _expert(name):
    return build_expert(name, TinyLMConfig(window=WINDOW, chunk_size=4))


def _qkv(B, T, H=2, d=4, dtype=torch.float64):
    return [torch.randn(B, H, T, d, dtype=dtype) for _ in range(3)]


def _naive_at(expert, q, k, v, positions):
    """The naive twin of each sequence ``b`` over its first ``positions[b][-1] + 1`` tokens,
    at ``positions[b]``: ``(B, H, len, d)``."""
    out = []
    for b, rows in enumerate(positions):
        n = rows[-1] + 1
        full = expert.naive(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        out.append(full[:, :, rows])
    return torch.cat(out)


@pytest.mark.parametrize("name", expert_names())
@pytest.mark.parametrize("prompt", [1, 2, WINDOW, WINDOW + 1, 9])
def test_decoding_one_token_at_a_time_matches_the_naive_twin(name, prompt):
    expert = _expert(name)
    B, total = 2, prompt + 6
    q, k, v = _qkv(B, total)
    state = expert.write_state(None, k[:, :, :prompt], v[:, :, :prompt], capacity=total)
    for t in range(prompt, total):
        out = expert.decode(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        ref = _naive_at(expert, q, k, v, [[t]] * B)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert state.lengths.tolist() == [total] * B


@pytest.mark.parametrize("name", expert_names())
@pytest.mark.parametrize("chunks", [(1, 5, 2), (4, 4, 4), (2, 1, 9)])
def test_decoding_in_chunks_matches_the_naive_twin(name, chunks):
    expert = _expert(name)
    B, total = 2, sum(chunks)
    q, k, v = _qkv(B, total)
    state, start = None, 0
    for i, size in enumerate(chunks):
        end = start + size
        if i == 0:
            state = expert.write_state(None, k[:, :, :end], v[:, :, :end], capacity=total)
        else:
            out = expert.decode(state, q[:, :, start:end], k[:, :, start:end],
                                v[:, :, start:end])
            ref = _naive_at(expert, q, k, v, [list(range(start, end))] * B)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        start = end


@pytest.mark.parametrize("name", expert_names())
@pytest.mark.parametrize("rows", [[1], [0, 2], [2, 0, 1], []])
def test_decoding_reads_only_the_rows_asked_for(name, rows):
    expert = _expert(name)
    B, prompt = 3, 5
    q, k, v = _qkv(B, prompt + 1)
    state = expert.write_state(None, k[:, :, :prompt], v[:, :, :prompt], capacity=prompt + 1)
    index = torch.tensor(rows, dtype=torch.long)
    out = expert.decode(state, q[index, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], index)
    assert out.shape == (len(rows), 2, 1, 4)
    assert state.lengths.tolist() == [prompt + 1] * B  # every sequence written, read or not
    if rows:
        ref = _naive_at(expert, q[index], k[index], v[index], [[prompt]] * len(rows))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", expert_names())
def test_prompts_of_different_lengths(name):
    """Right-padded prompts of lengths 1, 6 and 2 (the padding holds other numbers): each
    sequence continues from its own length."""
    expert = _expert(name)
    lengths, steps = [1, 6, 2], 5
    B, total = 3, 6 + steps
    q, k, v = _qkv(B, total)
    qs, ks, vs = [x.clone() for x in (q, k, v)]  # the true sequences, left-aligned
    state = expert.write_state(None, k[:, :, :6], v[:, :, :6], torch.tensor(lengths),
                               capacity=total)
    assert state.lengths.tolist() == lengths
    for step in range(steps):
        pos = [n + step for n in lengths]
        new = [torch.randn(B, 2, 1, 4, dtype=torch.float64) for _ in range(3)]
        for b, p in enumerate(pos):
            for seq, x in zip((qs, ks, vs), new, strict=True):
                seq[b, :, p] = x[b, :, 0]
        out = expert.decode(state, *new)
        ref = _naive_at(expert, qs, ks, vs, [[p] for p in pos])
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "local"])
def test_linear_and_local_states_do_not_grow(name):
    expert = _expert(name)
    q, k, v = _qkv(1, 40)
    state = expert.write_state(None, k[:, :, :4], v[:, :, :4], capacity=40)
    size = state.nbytes
    for t in range(4, 40):
        expert.decode(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert state.nbytes == size
    assert size < KVCache.empty(k, 40).nbytes


def test_float32_decoding_within_1e5():
    for name in expert_names():
        expert = _expert(name)
        q, k, v = _qkv(2, 20, dtype=torch.float32)
        state = expert.write_state(None, k[:, :, :7], v[:, :, :7], capacity=20)
        outs = [expert.decode(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
                for t in range(7, 20)]
        ref = expert.naive(q.double(), k.double(), v.double())[:, :, 7:]
        torch.testing.assert_close(torch.cat(outs, 2).double(), ref, rtol=1e-5, atol=1e-5)


def test_an_expert_without_a_state_of_its_own_recomputes_the_prefix():
    """The contract's default: a KV cache, and each read the expert's forward pass over the
    whole prefix; a user-registered expert decodes without writing any of it."""

    class Doubled(AttentionExpert):
        name = "doubled"

        def forward(self, q, k, v, positions=None):
            full = 2 * build_expert("full", TinyLMConfig())(q, k, v)
            return full if positions is None else full.gather(
                2, positions[:, None, :, None].expand(*q.shape[:2], positions.shape[1],
                                                      q.shape[3]))

        def naive(self, q, k, v):
            return 2 * build_expert("full", TinyLMConfig()).naive(q, k, v)

    expert = Doubled()
    q, k, v = _qkv(2, 9)
    state = expert.write_state(None, k[:, :, :3], v[:, :, :3], capacity=9)
    assert isinstance(state, KVCache)
    for t in range(3, 9):
        out = expert.decode(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        torch.testing.assert_close(out, expert.naive(q, k, v)[:, :, t:t + 1])


@pytest.mark.parametrize("name", expert_names())
def test_bidirectional_experts_refuse_to_decode(name):
    expert = build_expert(name, TinyLMConfig(window=WINDOW, causal=False))
    _, k, v = _qkv(1, 4)
    with pytest.raises(ValueError, match="causal"):
        expert.write_state(None, k, v)


def test_a_full_cache_refuses_to_overflow():
    expert = _expert("full")
    _, k, v = _qkv(1, 4)
    state = expert.write_state(None, k, v, capacity=5)
    expert.decode(state, k[:, :, :1], k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="holds 5 positions"):
        expert.decode(state, k[:, :, :1], k[:, :, :1], v[:, :, :1])


def test_lengths_are_checked():
    _, k, v = _qkv(2, 4)
    with pytest.raises(ValueError, match=r"lengths must hold one count in \[0, 4\]"):
        _expert("full").write_state(None, k, v, torch.tensor([5, 1]))


@pytest.mark.parametrize("name", expert_names())
@pytest.mark.parametrize("rows", [[1], []])
def test_a_chunk_read_for_some_rows_only(name, rows):
    expert = _expert(name)
    q, k, v = _qkv(2, 9)
    state = expert.write_state(None, k[:, :, :4], v[:, :, :4], capacity=9)
    index = torch.tensor(rows, dtype=torch.long)
    out = expert.decode(state, q[index, :, 4:], k[:, :, 4:], v[:, :, 4:], index)
    assert state.lengths.tolist() == [9, 9]
    assert out.shape == (len(rows), 2, 5, 4)
    if rows:
        ref = _naive_at(expert, q[index], k[index], v[index], [list(range(4, 9))])
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_linear_sums_accumulate_in_float32_under_autocast():
    """2000 bfloat16 tokens decoded under autocast: the running sums stay float32, so the last
    output is within bfloat16's read precision of the float64 naive twin on the same rounded
    inputs. A bfloat16 running sum of the same tokens (built here) drifts far past that bound:
    the check can fail."""
    from bayes_router.models.experts.naive import elu_feature_map

    expert = _expert("linear")
    torch.manual_seed(0)
    T = 2000
    q, k, v = (torch.randn(1, 2, T, 4).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = expert.write_state(None, k[:, :, :1], v[:, :, :1], capacity=T)
        for t in range(1, T):
            out = expert.decode(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert state.state.dtype == torch.float32
    ref = expert.naive(q.double(), k.double(), v.double())[:, :, -1:]
    error = float((out.double() - ref).abs().max())
    assert error < 0.005  # measured 0.0003
    # the same sums kept in bfloat16, token after token
    phi_k = elu_feature_map(k.double())
    ones = torch.ones(1, 2, T, 1, dtype=torch.float64)
    sums = torch.zeros(1, 2, 4, 5, dtype=torch.bfloat16)
    for t in range(T):
        sums += (phi_k[:, :, t, :, None] * torch.cat([v.double(), ones], -1)[:, :, t, None, :]
                 ).to(torch.bfloat16)
    read = elu_feature_map(q[:, :, -1:].double()) @ sums.double()
    drifted = read[..., :4] / (read[..., 4:] + expert.eps)
    assert float((drifted - ref).abs().max()) > 10 * error  # measured 0.055
