import pytest
import torch

from bayes_router.data import SyntheticConfig, batches, eval_batches, generate_task, task_batches


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
