"""The command line's training and model options come from the configuration dataclasses:
every field is settable, its default is the dataclass's, its help shows the default once."""

import argparse
import dataclasses

import pytest

from bayes_router.cli import build_parser, config_from_args
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import PHASE1_SIZE, TinyLMConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _settable(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("command_line", True)]


@pytest.mark.parametrize("command", ["train", "phase1", "sweep-beta0"])
def test_every_config_field_is_an_option(command):
    dests = {a.dest for a in _subparser(command)._actions}
    skipped = {"phase1": {"router"}, "sweep-beta0": {"beta0"}}.get(command, set())
    for cls in (TinyLMConfig, TrainConfig):
        missing = [f.name for f in _settable(cls) if f.name not in dests | skipped]
        assert not missing, (cls.__name__, missing)
    assert "vocab_size" not in dests and "causal" not in dests  # from the data; always causal


def test_the_defaults_are_the_dataclasses():
    args = build_parser().parse_args(["train", "--out", "x"])
    assert config_from_args(TrainConfig, args) == TrainConfig()
    assert config_from_args(TinyLMConfig, args) == TinyLMConfig(**PHASE1_SIZE)


def test_options_set_their_fields():
    """The four fields the hand-written options missed, renamed flags, aliases, switches,
    lists, and the flag that sets a field to None."""
    args = build_parser().parse_args([
        "train", "--out", "x", "--weight-decay", "0.1", "--kl-anneal-start", "0.2",
        "--gate-start", "0.3", "--gate-end", "0.6", "--corpus", "synthetic:recall",
        "--max-chars", "500", "--estimator", "stl", "--beta0", "0.5,2", "--eval-all",
        "--experts", "full,local", "--separate-qkv", "--untie-head",
        "--cost-includes-projections", "--mlp-ratio", "2", "--dense-hard-max-len", "0"])
    train = config_from_args(TrainConfig, args)
    assert (train.weight_decay, train.kl_anneal_start, train.gate_start, train.gate_end) == (
        0.1, 0.2, 0.3, 0.6)
    assert (train.dataset, train.dataset_max_chars, train.estimator) == (
        "synthetic:recall", 500, "stl")
    assert train.beta0 == (0.5, 2.0) and train.eval_batches is None
    model = config_from_args(TinyLMConfig, args, vocab_size=40)
    assert model.experts == ("full", "local") and model.vocab_size == 40
    assert not model.shared_qkv and not model.tie_weights and model.cost_includes_projections
    assert (model.mlp_ratio, model.dense_hard_max_len) == (2, 0)
    assert config_from_args(TrainConfig, build_parser().parse_args(
        ["train", "--out", "x", "--elbo", "iwae"])).estimator == "iwae"


def test_a_bad_value_is_refused_by_the_config(capsys):
    from bayes_router.cli import main

    assert main(["train", "--out", "unused", "--weight-decay", "-1"]) == 2
    assert "weight_decay must be a finite number >= 0" in capsys.readouterr().err


def test_help_shows_each_default_once():
    for command in ("train", "variance", "generate", "phase1"):
        text = " ".join(_subparser(command).format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text
        if command == "train":
            assert "(default: 0.003)" in text
        # an option whose help states its default gets no second one
        assert "(default 50; toy 20000) (default" not in text


def test_generate_takes_every_decoding_field():
    from bayes_router.inference.decoding import DecodeConfig

    dests = {a.dest for a in _subparser("generate")._actions}
    assert {f.name for f in _settable(DecodeConfig)} <= dests
    args = build_parser().parse_args(["generate", "run", "--routing", "gated",
                                      "--gate-threshold", "0.4", "--gate-measure", "random",
                                      "--top-k", "5", "--temperature", "0"])
    assert config_from_args(DecodeConfig, args) == DecodeConfig(
        routing="gated", gate_threshold=0.4, gate_measure="random", top_k=5, temperature=0.0)
    assert config_from_args(DecodeConfig, build_parser().parse_args(["generate", "run"])) == \
        DecodeConfig()


@pytest.mark.parametrize(("command", "module", "name", "required"), [
    ("variance", "bayes_router.experiments.variance_lab", "VarianceLabConfig", ["--out", "x"]),
    ("fit-beta0", "bayes_router.experiments.beta0_fit", "Beta0FitConfig", ["run"]),
])
def test_every_study_config_field_is_an_option_of_its_command(command, module, name, required):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    dests = {a.dest for a in _subparser(command)._actions}
    assert [f.name for f in dataclasses.fields(cls) if f.name not in dests] == []
    args = build_parser().parse_args([command, *required])
    assert config_from_args(cls, args) == cls()


def test_study_options_parse_as_before():
    from bayes_router.experiments.beta0_fit import Beta0FitConfig
    from bayes_router.experiments.variance_lab import VarianceLabConfig

    args = build_parser().parse_args([
        "variance", "--out", "x", "--toy", "--draws", "60", "--bootstrap", "0",
        "--particles", "", "--beta0-values", "0.5,2", "--estimators", "stl, dreg,",
        "--along-training", "0,5", "--sweep-draws", "3"])
    lab = config_from_args(VarianceLabConfig, args)
    assert lab == VarianceLabConfig(toy=True, num_draws=60, num_bootstrap=0, particles=(),
                                    beta0_values=(0.5, 2.0), estimators=("stl", "dreg"),
                                    along_training=(0, 5), sweep_draws=3)
    args = build_parser().parse_args(["fit-beta0", "run", "--method", "minka", "--update-pi",
                                      "--stat-batches", "2", "--grid", "0.1,10"])
    assert config_from_args(Beta0FitConfig, args) == Beta0FitConfig(
        method="minka", update_pi=True, stat_batches=2, grid=(0.1, 10.0))
    for argv in (["variance", "--out", "x", "--no-toy"], ["fit-beta0", "run", "--no-update-pi"]):
        build_parser().parse_args(argv[:-1])
        with pytest.raises(SystemExit):  # a switch, as before: no --no- form
            build_parser().parse_args(argv)
