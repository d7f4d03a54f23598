"""Training options of the routing study: static routers, priors, free bits, warm start, the
objective's logged parts, and their validation."""

import json
import math
from contextlib import nullcontext

import pytest
import torch

from bayes_router.experiments.training_runs import train_run
from bayes_router.inference.build import check_compatible
from bayes_router.inference.objective import FreeBitsELBO
from bayes_router.inference.train import make_objective, train
from bayes_router.inference.train_config import TrainConfig, objective_label
from bayes_router.models.config import TinyLMConfig
from tests.helpers import tiny_configs


@pytest.mark.parametrize("kwargs, match", [
    ({"router": "moe"}, "router must be one of"),
    ({"prior": "laplace"}, "prior must be one of"),
    ({"prior_mean": "fit"}, "prior_mean must be one of"),
    ({"prior": "seed", "prior_mean": "learn"}, "needs prior 'power'"),
    ({"free_bits": -0.1}, "free_bits must be"),
    ({"free_bits": 0.5, "estimator": "reparam-mc"}, "free_bits needs the analytic KL"),
    ({"eval_batches": 0}, "eval_batches"),
    ({"log_every": 0}, "log_every"),
])
def test_bad_training_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_objective_labels():
    assert objective_label(TrainConfig()) == "ELBO"
    assert objective_label(TrainConfig(router="fixed:full")).startswith("ELBO")
    assert objective_label(TrainConfig(free_bits=0.3)).startswith("not an ELBO (free bits 0.3")
    assert objective_label(TrainConfig(kl_weight=0.1)).startswith("not an ELBO (KL weight")
    assert "annealing" in objective_label(TrainConfig(kl_anneal_steps=10))
    assert isinstance(make_objective(TrainConfig(free_bits=0.3))[1], FreeBitsELBO)


def test_incompatible_router_and_model_fail_before_anything_is_written(tiny_data, tiny_corpus,
                                                                       tmp_path):
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, router="fixed:0.5,0.5")
    with pytest.raises(ValueError, match="gives 2 shares for the 3 experts"):
        train_run(model_cfg, train_cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    one = TinyLMConfig(**{**model_cfg.to_dict(), "experts": ("full",)})
    with pytest.raises(ValueError, match="at least 2 experts"):
        check_compatible(one, TrainConfig(router="bayesian"))


def test_history_logs_the_objectives_parts(tiny_data, tiny_corpus):
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=12, log_every=5,
                                        eval_batches=None, eval_every=12)
    result = train(model_cfg, train_cfg, tiny_data, progress=False)
    logged = [r["step"] for r in result.history if "nll" in r]
    assert logged == [1, 5, 10, 12]
    record = result.history[-1]
    assert len(record["kl_per_layer"]) == 2 and len(record["a0"]) == 2
    assert record["kl"] == pytest.approx(sum(record["kl_per_layer"]))
    assert [i + m for i, m in zip(record["information_per_layer"],
                                  record["marginal_kl_per_layer"], strict=True)] == \
        pytest.approx(record["kl_per_layer"], abs=1e-12)
    # the whole validation split: every window of it
    windows = tiny_data.num_windows("val", train_cfg.seq_len)
    assert result.evaluations[-1]["tokens"] == windows * train_cfg.seq_len


def test_logging_does_not_change_the_run(tiny_data, tiny_corpus):
    runs = [train(*tiny_configs(tiny_data, tiny_corpus, steps=6, log_every=every), tiny_data,
                  progress=False) for every in (1, 6)]
    assert [r["loss"] for r in runs[0].history] == [r["loss"] for r in runs[1].history]


@pytest.mark.parametrize("experts, router", [(("full",), "fixed:full"),
                                             (("local",), "fixed:local"),
                                             (("full", "linear", "local"), "fixed:0.2,0.5,0.3"),
                                             (("full", "linear", "local"), "soft:0.2,0.5,0.3")])
def test_static_and_one_expert_lms_train_evaluate_time_and_report(tiny_data, tiny_corpus,
                                                                  tmp_path, experts, router):
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, router=router, steps=4,
                                        eval_every=4)
    model_cfg = TinyLMConfig(**{**model_cfg.to_dict(), "experts": experts})
    metrics = train_run(model_cfg, train_cfg, tmp_path / "run", progress=False, eval_batches=1,
                        data=tiny_data)
    assert metrics["router"] == router and metrics["objective"].startswith("ELBO")
    if router.startswith("fixed"):
        assert metrics["soft"]["routing_entropy"] == 0.0
    else:  # every token mixed with s: H(s) / log K, computed here from the shares
        shares = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
        expected = float(-(shares * shares.log()).sum() / math.log(3)) * 100
        assert metrics["soft"]["routing_entropy"] == pytest.approx(expected, rel=1e-5)
    assert (metrics["timing"]["time_ratio"] is None) == ("full" not in experts)
    # the decoding step against the most expensive expert where there is no full
    assert metrics["timing"]["decode_time_ratio"] > 0
    assert metrics["timing"]["decode_reference"] == ("full" if "full" in experts
                                                     else experts[0])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Objective: **ELBO" in report
    assert json.loads((tmp_path / "run" / "config.json").read_text())["objective"]


def test_warm_start_loads_the_lm_and_checks_its_configuration(tiny_data, tiny_corpus, tmp_path):
    model_cfg, first = tiny_configs(tiny_data, tiny_corpus, router="prior-free", steps=3)
    trained = train(model_cfg, first, tiny_data, out_dir=tmp_path / "stage1", progress=False)
    _, second = tiny_configs(tiny_data, tiny_corpus, steps=1, warm_start=str(tmp_path / "stage1"),
                             lr=1e-12)
    warm = train(model_cfg, second, tiny_data, progress=False)
    for (name, a), b in zip(trained.model.lm.state_dict().items(),
                            warm.model.lm.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    wider = TinyLMConfig(**{**model_cfg.to_dict(), "d_model": 32})
    with pytest.raises(ValueError, match=r"warm_start: .* another configuration .*d_model"):
        check_compatible(wider, second)
    other_vocab = TinyLMConfig(**{**model_cfg.to_dict(), "vocab_size": model_cfg.vocab_size + 1})
    with pytest.raises(ValueError, match="vocab_size"):
        check_compatible(other_vocab, second)
    with pytest.raises(ValueError, match="warm_start: no checkpoint"):
        check_compatible(model_cfg, TrainConfig(warm_start=str(tmp_path / "missing")))


@pytest.mark.parametrize("flags, message", [
    (["--router", "fixed:0.5,0.6,0.1"], "sum to 1"),
    (["--router", "moe"], "router must be one of"),
    (["--prior", "cauchy"], "invalid choice"),
    (["--free-bits", "-1"], "free_bits must be a finite number >= 0"),
    (["--warm-start", "no/such/run"], "warm_start: no checkpoint"),
])
def test_cli_gives_one_clear_error_for_bad_study_options(tmp_path, tiny_corpus, capsys, flags,
                                                         message):
    from bayes_router.cli import main

    with pytest.raises(SystemExit) if message == "invalid choice" else nullcontext():
        code = main(["train", "--corpus", str(tiny_corpus), "--steps", "1", "--seq-len", "32",
                     "--max-seq-len", "32", "--out", str(tmp_path / "run"), *flags])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.json").exists()
