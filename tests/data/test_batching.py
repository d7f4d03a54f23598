import pytest
import torch

from bayes_router.data import SyntheticConfig, batches, eval_batches, generate_task, task_batches
from bayes_router.data.tokens import TokenData


def test_random_windows_have_shape_and_shift():
    tokens = torch.arange(100)
    g = torch.Generator().manual_seed(0)
    got = list(batches(tokens, batch_size=4, seq_len=7, generator=g, num_batches=5))
    assert len(got) == 5
    for x, y in got:
        assert x.shape == y.shape == (4, 7)
        assert x.dtype == torch.long
        # tokens are their own positions: each row is a contiguous window and y = x + 1
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 6, dtype=torch.long))
        assert torch.equal(y, x + 1)
        assert int(x.min()) >= 0 and int(y.max()) <= 99


def test_random_windows_are_reproducible_and_reach_the_last_token():
    tokens = torch.arange(10)

    def draw():
        g = torch.Generator().manual_seed(3)
        return torch.cat([y for _, y in batches(tokens, 8, 9, generator=g, num_batches=20)])

    first, second = draw(), draw()
    assert torch.equal(first, second)
    assert set(first[:, -1].tolist()) == {9}  # with len = seq_len + 1 the only window ends last


def test_eval_windows_cover_every_target_once():
    tokens = torch.arange(23)
    got = list(eval_batches(tokens, batch_size=2, seq_len=5))
    assert [tuple(x.shape) for x, _ in got] == [(2, 5), (2, 5)]
    targets = torch.cat([y.flatten() for _, y in got])
    assert targets.tolist() == list(range(1, 21))
    for x, y in got:
        assert torch.equal(y, x + 1)


def test_eval_keeps_the_partial_window_on_request():
    tokens = torch.arange(23)
    got = list(eval_batches(tokens, batch_size=3, seq_len=5, drop_last=False))
    x_last, y_last = got[-1]
    assert x_last.shape == (1, 2) and torch.equal(y_last, x_last + 1)
    targets = torch.cat([y.flatten() for _, y in got])
    assert targets.tolist() == list(range(1, 23))
    assert len(list(eval_batches(tokens, 1, 5, max_batches=2))) == 2


@pytest.mark.parametrize("kwargs, field", [
    ({"batch_size": 0, "seq_len": 4}, "batch_size"),
    ({"batch_size": 2, "seq_len": 0}, "seq_len"),
    ({"batch_size": 2, "seq_len": 10}, "seq_len"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    tokens = torch.arange(10)
    with pytest.raises(ValueError, match=field):
        next(batches(tokens, **kwargs))
    with pytest.raises(ValueError, match=field):
        next(eval_batches(tokens, **kwargs))


def test_tokens_must_be_one_dimensional_integers():
    with pytest.raises(ValueError, match="1-D"):
        next(batches(torch.zeros(4, 4, dtype=torch.long), 1, 2))
    with pytest.raises(TypeError, match="integer"):
        next(batches(torch.zeros(10), 1, 2))


def test_task_batches_visit_every_sequence_once():
    task = generate_task(SyntheticConfig(task="copy", num_sequences=10, seq_len=16, window=4))
    got = list(task_batches(task, batch_size=4, generator=torch.Generator().manual_seed(0)))
    assert [x.shape[0] for x, _, _ in got] == [4, 4, 2]
    x = torch.cat([x for x, _, _ in got])
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, task.x.tolist()))
    for x, y, oracle in got:
        assert x.shape == y.shape == oracle.shape


def test_training_batches_of_token_data_are_the_tested_windows():
    """TokenData.sample_batch (what training draws) is sample_windows on the split: windows
    start where torch.randint puts them and y is x shifted by one, built here by hand."""
    tokens = torch.arange(200) % 37
    data = TokenData("toy", {"train": tokens, "val": tokens}, vocab_size=37)
    x, y = data.sample_batch("train", 5, 12, torch.Generator().manual_seed(3))
    starts = torch.randint(200 - 12, (5, 1), generator=torch.Generator().manual_seed(3))
    for row, start in enumerate(starts.flatten().tolist()):
        assert x[row].tolist() == tokens[start:start + 12].tolist()
        assert y[row].tolist() == tokens[start + 1:start + 13].tolist()
    assert data.num_windows("train", 12) == 199 // 12


def test_synthetic_token_data_samples_and_walks_sequences_with_their_oracle():
    x = torch.arange(60).view(6, 10)
    y, oracle = x + 1, x % 3
    data = TokenData("task", {"train": (x, y, oracle)}, vocab_size=61, synthetic=True)
    bx, by = data.sample_batch("train", 4, 7, torch.Generator().manual_seed(1))
    rows = torch.randint(6, (4,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(bx, x[rows, :7]) and torch.equal(by, y[rows, :7])
    walked = list(data.eval_batches_with_oracle("train", 4, 7))
    assert [b[0].shape for b in walked] == [(4, 7), (2, 7)]
    assert torch.equal(torch.cat([b[2] for b in walked]), oracle[:, :7])
    assert len(list(data.eval_batches_with_oracle("train", 4, 7, max_batches=1))) == 1
    with pytest.raises(ValueError, match="seq_len"):
        data.sample_batch("train", 2, 11, torch.Generator())
