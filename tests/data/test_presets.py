import pytest
import torch

from bayes_router.data import ORACLE_LABEL_IDS, SyntheticCorpus
from bayes_router.data.corpus import load_corpus
from bayes_router.data.synthetic import PRESETS, SyntheticConfig, generate_task, preset_config
from bayes_router.data.tokens import token_data

FULL, ANY = ORACLE_LABEL_IDS["full"], ORACLE_LABEL_IDS["any"]
TINY = {"num_sequences": 16, "num_eval_sequences": 4}


def _stream(task, n):
    return task.x[n].tolist() + [task.y[n, -1].item()]


def _recall_far(**overrides):
    return load_corpus("synthetic:recall-far", **{**TINY, **overrides})


def test_recall_far_loads_with_its_defaults():
    corpus = _recall_far()
    assert isinstance(corpus, SyntheticCorpus) and corpus.name == "synthetic:recall-far"
    fields = PRESETS["recall-far"]["fields"]
    assert corpus.config.task == "recall"
    assert corpus.train.x.shape == (16, fields["seq_len"])
    assert corpus.train.vocab_size == fields["vocab_size"]
    data = token_data("synthetic:recall-far", seed=1, **TINY)
    assert data.synthetic and data.name == "synthetic:recall-far"


@pytest.mark.parametrize("seq_len, window", [(32, 4), (32, 10), (48, 16), (64, 8)])
def test_every_recall_target_lies_beyond_two_windows(seq_len, window):
    task = _recall_far(seq_len=seq_len, window=window).train
    targets = task.oracle == FULL
    positions = torch.arange(seq_len).expand_as(task.x)
    distance = (positions - task.source)[targets]
    assert int(distance.min()) > 2 * window
    assert int(distance.min()) >= task.config.min_recall_distance


def test_recall_far_labels_the_stored_values_in_stored_order():
    task = _recall_far().train
    config = task.config
    pairs, queries = config.num_pairs, config.num_queries
    for n in range(task.x.shape[0]):
        stream = _stream(task, n)
        stored = dict(zip(stream[0:2 * pairs:2], stream[1:2 * pairs:2], strict=True))
        asked = stream[len(stream) - 3 * queries + 1::3]
        answers = stream[len(stream) - 3 * queries + 2::3]
        assert asked == stream[0:2 * pairs:2][:queries]  # stored order
        assert answers == [stored[key] for key in asked]
    # "full" on the answers only, at x positions L - 3q + 3j + 2
    seq_len = config.seq_len
    expected = torch.full((seq_len,), ANY)
    expected[seq_len - 3 * queries + 2::3] = FULL
    assert torch.equal(task.oracle, expected.expand_as(task.oracle))


def test_min_recall_distance_matches_a_brute_force_count():
    for order in ("random", "stored"):
        for pairs, queries in [(4, 4), (4, 2), (3, 1)]:
            config = SyntheticConfig(task="recall", seq_len=40, window=6, vocab_size=40,
                                     num_pairs=pairs, num_queries=queries, query_order=order,
                                     num_sequences=512, num_eval_sequences=2)
            task = generate_task(config)
            targets = task.oracle == FULL
            positions = torch.arange(40).expand_as(task.x)
            assert int((positions - task.source)[targets].min()) == config.min_recall_distance


def test_random_order_is_the_default_and_unchanged():
    config = SyntheticConfig(task="recall", seq_len=40, window=6, vocab_size=40,
                             num_sequences=64, num_eval_sequences=2)
    assert config.query_order == "random"
    task = generate_task(config)
    asked = task.x[:, 40 - 12 + 1::3]
    stored = task.x[:, 0:8:2]
    assert not torch.equal(asked, stored)  # 64 random orders are not all the stored one


@pytest.mark.parametrize("overrides, field", [
    ({"seq_len": 32, "window": 11}, "seq_len/window"),
    ({"seq_len": 40, "window": 16}, "seq_len"),
    ({"task": "copy"}, "task"),
    ({"query_order": "sorted"}, "query_order"),
    ({"colour": 1}, "colour"),
])
def test_bad_preset_options_are_rejected(overrides, field):
    with pytest.raises((ValueError, TypeError), match=field):
        _recall_far(**overrides)


def test_preset_error_names_the_seq_len_needed():
    with pytest.raises(ValueError, match="seq_len >= 34"):
        preset_config("recall-far", seq_len=32, window=11)
    assert preset_config("recall-far", seq_len=34, window=11).min_recall_distance == 23
    with pytest.raises(ValueError, match="preset"):
        preset_config("recall-near")
