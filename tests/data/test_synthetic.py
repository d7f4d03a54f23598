import json
import math

import numpy as np
import pytest
import torch

from bayes_router.data import (
    ANY_LABEL,
    ORACLE_LABEL_IDS,
    ORACLE_LABELS,
    SYNTHETIC_TASKS,
    SyntheticConfig,
    generate_task,
    synthetic_corpus,
    token_layout,
)

FULL, LINEAR, LOCAL = (ORACLE_LABEL_IDS[name] for name in ("full", "linear", "local"))
SMALL = {"num_sequences": 24, "num_eval_sequences": 4, "seq_len": 96, "vocab_size": 40,
         "window": 12, "copy_distance": 5, "num_pairs": 4, "num_queries": 3}


def _task(task, **overrides):
    return generate_task(SyntheticConfig(task=task, **{**SMALL, **overrides}))


def _stream(task, n):
    """The whole token stream of sequence n: x followed by the last target."""
    return task.x[n].tolist() + [task.y[n, -1].item()]


def test_labels_match_expert_names():
    assert ORACLE_LABELS == ("full", "linear", "local")
    assert ANY_LABEL == -1 and ORACLE_LABEL_IDS["any"] == -1


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_shapes_shift_and_ranges(name):
    task = _task(name)
    assert task.x.shape == task.y.shape == task.oracle.shape == task.source.shape == (24, 96)
    assert task.background_angle.shape == (24, 96)
    assert task.x.dtype == task.y.dtype == task.oracle.dtype == torch.long
    assert torch.equal(task.y[:, :-1], task.x[:, 1:])
    assert int(task.x.min()) >= 0 and int(task.x.max()) < task.vocab_size == 40
    assert set(task.oracle.unique().tolist()) <= {ANY_LABEL, FULL, LINEAR, LOCAL}


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_sources_point_at_the_target_token(name):
    task = _task(name)
    copies = (task.oracle == FULL) | (task.oracle == LOCAL)
    assert torch.equal(task.source >= 0, copies)
    positions = torch.arange(task.x.shape[1]).expand_as(task.x)
    assert bool((task.source[copies] <= positions[copies]).all())
    gathered = task.x.gather(1, task.source.clamp(min=0))
    assert torch.equal(gathered[copies], task.y[copies])


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_generation_is_reproducible_per_split_and_seed(name):
    config = SyntheticConfig(task=name, **SMALL)
    assert torch.equal(generate_task(config).x, generate_task(config).x)
    assert not torch.equal(generate_task(config, "val").x, generate_task(config, "test").x)
    other = SyntheticConfig(task=name, seed=1, **SMALL)
    assert not torch.equal(generate_task(config).x, generate_task(other).x)


def _check_recall(task, config):
    """Recompute every recall answer from the raw tokens: y after a queried key is its value."""
    layout = task.layout
    for n in range(task.x.shape[0]):
        s = _stream(task, n)
        stored = {s[2 * i]: (s[2 * i + 1], 2 * i + 1) for i in range(config.num_pairs)}
        assert len(stored) == config.num_pairs  # keys distinct
        assert all(k in layout.keys for k in stored)
        asked = [t for t in range(1, task.x.shape[1]) if s[t - 1] == layout.query]
        assert len(asked) == config.num_queries
        full = (task.oracle[n] == FULL).nonzero().flatten().tolist()
        assert full == asked
        for t in asked:
            value, where = stored[s[t]]
            assert task.y[n, t].item() == value
            assert t - where > config.window  # the stored value lies outside the window
            assert t - (where - 1) > config.window


def _check_copy(task, config):
    """Recompute every copy: after COPY, the next d-1 tokens repeat the ones d back."""
    d = config.copy_distance
    for n in range(task.x.shape[0]):
        s = _stream(task, n)
        expected = []
        for marker in (m for m, token in enumerate(s) if token == task.layout.copy):
            for p in range(marker + 1, min(marker + d, len(s))):
                if p - d >= 0:
                    assert s[p] == s[p - d]
                    expected.append(p - 1)  # predicted at position p - 1 of x
        local = (task.oracle[n] == LOCAL).nonzero().flatten().tolist()
        assert local == expected
        for t in local:
            assert task.y[n, t].item() == task.x[n, t + 1 - d].item()
            assert t - (t + 1 - d) <= config.window  # look-back d - 1 is inside the window


def test_recall_answers_are_determined_by_the_stored_pairs():
    config = SyntheticConfig(task="recall", **SMALL)
    task = generate_task(config)
    _check_recall(task, config)
    assert set(task.oracle.unique().tolist()) == {ANY_LABEL, FULL}


def test_copy_targets_repeat_the_token_d_back():
    config = SyntheticConfig(task="copy", **SMALL)
    task = generate_task(config)
    _check_copy(task, config)
    assert set(task.oracle.unique().tolist()) == {ANY_LABEL, LOCAL}
    assert bool((task.x != task.layout.query).all())


def test_mixed_holds_all_three_mechanisms_in_every_sequence():
    config = SyntheticConfig(task="mixed", **SMALL)
    task = generate_task(config)
    _check_recall(task, config)
    _check_copy(task, config)
    d = config.copy_distance
    assert bool(((task.oracle == FULL).sum(1) == config.num_queries).all())
    assert bool(((task.oracle == LOCAL).sum(1) == config.num_copy_segments * (d - 1)).all())
    assert bool(((task.oracle == LINEAR).sum(1) > 0).all())
    linear = task.oracle == LINEAR
    assert all(int(v) in task.layout.background for v in task.y[linear].unique())
    assert torch.equal(task.background_angle.isnan(), ~linear)


def _expected_mean_cosine(angle, size, kappa):
    """E[cos(2 pi m / M - theta)] under p_m ∝ exp(kappa cos(2 pi m / M - theta)), in numpy."""
    grid = 2 * np.pi * np.arange(size) / size
    delta = grid[None, :] - angle[:, None]
    weights = np.exp(kappa * np.cos(delta))
    return ((weights * np.cos(delta)).sum(1) / weights.sum(1)).mean()


@pytest.mark.parametrize("kappa", [0.0, 2.0])
def test_drift_tokens_follow_their_background_distribution(kappa):
    config = SyntheticConfig(task="drift", **{**SMALL, "num_sequences": 256},
                             concentration=kappa)
    task = generate_task(config)
    assert bool((task.oracle == LINEAR).all())
    size = config.background_size
    symbol = (task.y - task.layout.background.start).numpy().ravel()
    assert symbol.min() >= 0 and symbol.max() < size
    angle = task.background_angle.double().numpy().ravel()
    empirical = np.cos(2 * np.pi * symbol / size - angle).mean()
    assert empirical == pytest.approx(_expected_mean_cosine(angle, size, kappa), abs=0.03)
    steps = task.background_angle.diff(dim=1).abs()
    assert float(steps.max()) <= config.max_drift / config.seq_len + 1e-5  # slow drift


def test_drift_is_informative_beyond_the_window():
    """With kappa > 0 the token distribution depends on the drifting centre."""
    task = _task("drift", num_sequences=256)
    size = task.config.background_size
    symbol = (task.y - task.layout.background.start).numpy().ravel()
    angle = task.background_angle.numpy().ravel()
    assert np.cos(2 * np.pi * symbol / size - angle).mean() > 0.4


def test_synthetic_corpus_has_independent_splits():
    corpus = synthetic_corpus(SyntheticConfig(task="mixed", **SMALL))
    assert corpus.name == "synthetic:mixed"
    assert corpus.train.x.shape[0] == 24 and corpus.test.x.shape[0] == 4
    assert corpus.split("val").split == "val"
    assert not torch.equal(corpus.val.x, corpus.test.x)


def test_config_round_trips_through_json():
    config = SyntheticConfig(task="copy", window=8)
    assert config.copy_distance == 4
    restored = SyntheticConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    with pytest.raises(ValueError, match="unknown fields"):
        SyntheticConfig.from_dict({"colour": 1})


@pytest.mark.parametrize("overrides, field", [
    ({"task": "sorting"}, "task"),
    ({"copy_distance": 13}, "copy_distance"),
    ({"copy_distance": 1}, "copy_distance"),
    ({"num_queries": 5}, "num_queries"),
    ({"num_pairs": 20}, "num_pairs"),
    ({"seq_len": 20}, "seq_len"),
    ({"vocab_size": 12}, "vocab_size"),
    ({"window": 0}, "window"),
    ({"concentration": -1.0}, "concentration"),
    ({"max_drift": math.inf}, "max_drift"),
])
def test_bad_configuration_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{"task": "mixed", **SMALL, **overrides})


def test_token_layout_partitions_the_vocabulary():
    layout = token_layout(64, background_size=8)
    groups = [[layout.query], [layout.copy], layout.background, layout.keys, layout.values,
              layout.content]
    ids = [i for group in groups for i in group]
    assert sorted(ids) == list(range(64))
    with pytest.raises(ValueError, match="background_size"):
        token_layout(64, background_size=1)
