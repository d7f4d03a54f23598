"""The SVI loop: learning, checkpoint/resume, divergence, bad configurations and checkpoints."""

import importlib
import json

import pytest
import torch

from bayes_router.inference import objective as objective_module
from bayes_router.inference.checkpoint import CheckpointError, load_checkpoint
from bayes_router.inference.objective import AuxiliaryOptimiser
from bayes_router.inference.train import TrainingDiverged, train
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import TinyLMConfig

# the package re-exports the function `train`, which hides the module of the same name
train_module = importlib.import_module("bayes_router.inference.train")

@pytest.fixture
def data(tiny_data):
    return tiny_data


def _cfgs(data, **train_kwargs):
    model_cfg = TinyLMConfig(vocab_size=data.vocab_size, d_model=16, n_heads=2, n_layers=2,
                             max_seq_len=32, window=4, chunk_size=8, controller_hidden=8)
    defaults = dict(steps=10, batch_size=4, seq_len=32, eval_every=5, eval_batches=1,
                    checkpoint_every=5, dataset="unused", lr=1e-2)
    return model_cfg, TrainConfig(**{**defaults, **train_kwargs})


@pytest.mark.parametrize("router", ["bayesian", "prior-free"])
def test_short_training_lowers_the_loss(data, router):
    model_cfg, train_cfg = _cfgs(data, router=router, steps=60, eval_every=60)
    result = train(model_cfg, train_cfg, data, progress=False)
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    assert result.evaluations[-1]["val_bpc"] < 6.0  # below uniform over 98 symbols (6.6 bits)


def test_resume_reproduces_an_uninterrupted_run(data, tmp_path):
    model_cfg, train_cfg = _cfgs(data, estimator="reparam-mc", num_particles=2,
                                 kl_anneal_steps=6)
    whole = train(model_cfg, train_cfg, data, out_dir=tmp_path / "a", progress=False)
    train(model_cfg, train_cfg, data, out_dir=tmp_path / "b", progress=False, max_steps=3)
    resumed = train(model_cfg, train_cfg, data, out_dir=tmp_path / "b", progress=False,
                    resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    assert [e["step"] for e in resumed.evaluations] == [e["step"] for e in whole.evaluations]
    for (name, p), (_, q) in zip(whole.model.state_dict().items(),
                                 resumed.model.state_dict().items()):
        assert torch.equal(p, q), name


def test_divergence_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    model_cfg, train_cfg = _cfgs(data)
    calls = {"n": 0}
    real = objective_module.loss_and_surrogate

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, surrogate = real(*args, **kwargs)
        return (loss * float("nan"), surrogate) if calls["n"] == 7 else (loss, surrogate)

    monkeypatch.setattr(objective_module, "loss_and_surrogate", poisoned)
    with pytest.raises(TrainingDiverged, match="step 7") as error:
        train(model_cfg, train_cfg, data, out_dir=tmp_path, progress=False)
    assert error.value.step == 7
    assert load_checkpoint(error.value.checkpoint)["step"] == 5


def test_bad_checkpoints_are_refused_and_not_overwritten(data, tmp_path):
    model_cfg, train_cfg = _cfgs(data, steps=5)
    train(model_cfg, train_cfg, data, out_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()
    other = TrainConfig(**{**train_cfg.to_dict(), "lr": 0.5})
    with pytest.raises(CheckpointError, match="different configuration"):
        train(model_cfg, other, data, out_dir=tmp_path, progress=False, resume=True)
    assert path.read_bytes() == before
    path.write_bytes(before[:100])
    with pytest.raises(CheckpointError, match="not a readable"):
        train(model_cfg, train_cfg, data, out_dir=tmp_path, progress=False, resume=True)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a bayes-router checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_loads_with_weights_only(data, tmp_path):
    model_cfg, train_cfg = _cfgs(data, steps=5)
    train(model_cfg, train_cfg, data, out_dir=tmp_path, progress=False)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["step"] == 5 and json.loads(payload["train_config"])["steps"] == 5
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


@pytest.mark.parametrize("kwargs,match", [
    ({"num_particles": 0}, "num_particles"), ({"estimator": "magic"}, "reparam-mc"),
    ({"beta0": 0.0}, "beta0"), ({"beta0": "auto"}, "beta0"), ({"router": "moe"}, "router"),
    ({"steps": 0}, "steps"), ({"gate_final": 2.0}, "gate_final"), ({"kl_weight": 0}, "kl_weight"),
])
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_schedules():
    cfg = TrainConfig(steps=100, kl_anneal_steps=50, kl_anneal_start=0.2, gate_final=0.4,
                      gate_start=0.5, gate_end=0.9)
    assert cfg.kl_scale(0) == pytest.approx(0.2) and cfg.kl_scale(25) == pytest.approx(0.6)
    assert cfg.kl_scale(80) == 1.0
    weighted = TrainConfig(steps=100, kl_anneal_steps=50, kl_weight=0.1)
    assert weighted.kl_scale(25) == pytest.approx(0.05) and weighted.kl_scale(90) == 0.1
    assert cfg.gate_threshold(50) == 0.0 and cfg.gate_threshold(70) == pytest.approx(0.2)
    assert cfg.gate_threshold(95) == pytest.approx(0.4)


def test_gated_training_runs(data):
    model_cfg, train_cfg = _cfgs(data, steps=6, gate_final=0.9, gate_start=0.0, gate_end=0.5)
    result = train(model_cfg, train_cfg, data, progress=False)
    assert result.history[-1]["gate_threshold"] == pytest.approx(0.9)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_neural_baselines_are_trained(data, monkeypatch):
    """score-nn-baseline's nets (created on first sight of a site) get optimiser steps."""
    model_cfg, train_cfg = _cfgs(data, steps=3, estimator="score-nn-baseline")
    seen = {}
    real = AuxiliaryOptimiser.step

    def record(self):
        if "initial" not in seen:
            seen["initial"] = [p.detach().clone() for p in self.elbo.baselines.parameters()]
        seen["objective"] = self.elbo
        return real(self)

    monkeypatch.setattr(AuxiliaryOptimiser, "step", record)
    train(model_cfg, train_cfg, data, progress=False)
    final = list(seen["objective"].baselines.parameters())
    assert seen["initial"] and len(final) == len(seen["initial"])
    assert all(not torch.equal(a, b.detach()) for a, b in zip(seen["initial"], final))


def test_resume_accepts_checkpoints_without_newer_fields(data, tmp_path):
    """A checkpoint written before a config field existed resumes with that field's default."""
    model_cfg, train_cfg = _cfgs(data, steps=4)
    train(model_cfg, train_cfg, data, out_dir=tmp_path, progress=False, max_steps=2)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    old = json.loads(payload["train_config"])
    del old["kl_weight"]
    payload["train_config"] = json.dumps(old)
    train_module.save_checkpoint(tmp_path / "checkpoint.pt", payload)
    result = train(model_cfg, train_cfg, data, out_dir=tmp_path, progress=False, resume=True)
    assert result.step == 4
