"""Every route to divergence stops training at the failing step, names what failed, writes
diverged.json and keeps a checkpoint that is finite."""

import importlib
import json
import math

import pytest
import torch

from bayes_router.cli import main
from bayes_router.experiments.training_runs import train_run
from bayes_router.inference import objective as objective_module
from bayes_router.inference.checkpoint import load_checkpoint
from bayes_router.inference.train import TrainingDiverged
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.bayesian import BayesianRoutedLM
from tests.helpers import tiny_configs

# the package re-exports the function `train`, which hides the module of the same name
train_module = importlib.import_module("bayes_router.inference.train")
FAIL_AT = 7


def _poison_loss(monkeypatch, how):
    real = objective_module.loss_and_surrogate
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, surrogate = real(*args, **kwargs)
        if calls["n"] == FAIL_AT:
            return how(loss, surrogate)
        return loss, surrogate

    monkeypatch.setattr(objective_module, "loss_and_surrogate", poisoned)


def _poison_parameters(monkeypatch):
    real = train_module.svi_step
    calls = {"n": 0}

    def poisoned(elbo, model, *args, **kwargs):
        outcome = real(elbo, model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == FAIL_AT:
            with torch.no_grad():
                next(model.parameters()).fill_(math.inf)
        return outcome

    monkeypatch.setattr(train_module, "svi_step", poisoned)


def _poison_concentration(monkeypatch):
    real_step, real_concentration = train_module.svi_step, BayesianRoutedLM.concentration
    state = {"step": 0}

    def counted(*args, **kwargs):
        state["step"] += 1
        return real_step(*args, **kwargs)

    def poisoned(self, layer, features):
        concentration, logits = real_concentration(self, layer, features)
        if state["step"] >= FAIL_AT:  # NaN concentrations from step FAIL_AT on
            concentration = concentration * math.nan
        return concentration, logits

    monkeypatch.setattr(train_module, "svi_step", counted)
    monkeypatch.setattr(BayesianRoutedLM, "concentration", poisoned)


ROUTES = {
    "nan loss": (lambda m: _poison_loss(m, lambda l, s: (l * math.nan, s)), "loss", "nan"),
    "absurd loss": (lambda m: _poison_loss(m, lambda l, s: (l * 0 - 3.56e7, s)), "loss",
                    "impossible"),
    "exploding loss": (lambda m: _poison_loss(m, lambda l, s: (l * 1e6, s)), "loss",
                       "exploded"),
    "non-finite gradient": (lambda m: _poison_loss(m, lambda l, s: (l, s * math.nan)),
                            "gradient norm", "nan"),
    "non-finite parameters": (_poison_parameters, "parameters", "not finite"),
    "invalid distribution": (_poison_concentration, "distribution parameters",
                             "Expected parameter"),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_divergence_route_stops_at_its_step(route, monkeypatch, tiny_data, tiny_corpus,
                                                  tmp_path):
    poison, quantity, text = ROUTES[route]
    poison(monkeypatch)
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=10, checkpoint_every=1,
                                        eval_every=10)
    with pytest.raises(TrainingDiverged) as error:
        train_run(model_cfg, train_cfg, tmp_path / "run", progress=False, data=tiny_data)
    assert error.value.step == FAIL_AT and error.value.quantity == quantity
    assert f"step {FAIL_AT}: {quantity}" in str(error.value) and text in str(error.value)
    record = json.loads((tmp_path / "run" / "diverged.json").read_text())
    assert record["step"] == FAIL_AT and record["quantity"] == quantity
    kept = load_checkpoint(error.value.checkpoint)
    assert kept["step"] == FAIL_AT - 1
    for name, value in kept["model"].items():
        assert bool(torch.isfinite(value).all()), name
    for state in kept["optimizer"]["state"].values():
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v))


def test_the_cli_reports_divergence_in_one_line(monkeypatch, tiny_corpus, tmp_path, capsys):
    ROUTES["absurd loss"][0](monkeypatch)
    code = main(["train", "--corpus", str(tiny_corpus), "--steps", "10", "--seq-len", "32",
                 "--max-seq-len", "32", "--max-chars", "100000",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"training diverged at step {FAIL_AT}" in err and "Traceback" not in err
    messages = [line for line in err.splitlines() if "error" in line]  # besides the progress bar
    assert len(messages) == 1 and messages[0].startswith("bayes-router train: error: training")


def test_a_real_explosion_is_stopped_at_its_first_step(tiny_data, tiny_corpus, tmp_path):
    """lr = 1e3 (the largest accepted) blows the loss up by orders of magnitude at once."""
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=10, lr=1e3,
                                        checkpoint_every=1, eval_every=10)
    with pytest.raises(TrainingDiverged, match="training diverged at step") as error:
        train_run(model_cfg, train_cfg, tmp_path / "run", progress=False, data=tiny_data)
    assert error.value.step <= 3
    assert (tmp_path / "run" / "diverged.json").exists()


@pytest.mark.parametrize("kwargs", [{"lr": math.inf}, {"lr": 1e39}, {"kl_weight": math.inf},
                                    {"lr": math.nan}, {"grad_clip": math.inf}])
def test_non_finite_or_absurd_rates_are_refused_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TrainConfig(**kwargs)
