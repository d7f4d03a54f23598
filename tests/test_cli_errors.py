"""Bad command-line input: one line on stderr naming the input, a usage exit status, no
traceback and nothing written (the inputs of the reliability review, each a case here)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bayes_router.cli import main
from bayes_router.experiments.training_runs import train_run
from tests.helpers import tiny_configs

TINY = ["--steps", "2", "--seq-len", "32", "--max-seq-len", "32", "--d-model", "16",
        "--window", "4", "--chunk-size", "8", "--eval-every", "2", "--checkpoint-every", "2",
        "--eval-batches", "1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_corpus, tiny_data):
    """A folder with a finished run, a data folder, and broken copies of the run."""
    root = tmp_path_factory.mktemp("cli")
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=2, eval_every=2,
                                        checkpoint_every=2)
    train_run(model_cfg, train_cfg, root / "run", progress=False, data=tiny_data,
              eval_batches=1)
    (root / "afile").write_text("x")
    (root / "data").mkdir()
    (root / "data" / "data.json").write_text("{}")
    payload = torch.load(root / "run" / "checkpoint.pt", weights_only=True)
    shutil.copytree(root / "run", root / "missing-field")
    torch.save({k: v for k, v in payload.items() if k != "model_config"},
               root / "missing-field" / "checkpoint.pt")
    shutil.copytree(root / "run", root / "pickle")
    torch.save({"format": payload["format"], "object": Path("x")}, root / "pickle" /
               "checkpoint.pt")
    shutil.copytree(root / "run", root / "truncated")
    data = (root / "run" / "checkpoint.pt").read_bytes()
    (root / "truncated" / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    for name, text in {"empty": "{}", "list": "[]", "model5": '{"model": 5}',
                       "cut": '{"model": {"d_mo'}.items():
        for kind, sub in (("phase1", "bayesian-seed0"), ("sweep", "beta0=1/seed0")):
            folder = root / f"{kind}-{name}" / sub
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(text)
    return root


def cases(corpus):
    train = ["train", "--corpus", corpus, *TINY]
    return {
        "out is a file": ([*train, "--out", "afile"], "--out afile is a file"),
        "out cannot be created": ([*train, "--out", "afile/below"], "cannot be written"),
        "empty out": ([*train, "--out", ""], "--out must name a folder"),
        "empty corpus": (["train", *TINY, "--corpus", "", "--out", "r"], "got ''"),
        "another command's folder": ([*train, "--out", "data"],
                                     "holds the output of `bayes-router data`"),
        "phase1 into a data folder": (["phase1", "--corpus", corpus, *TINY, "--out", "data"],
                                      "holds the output of `bayes-router data`"),
        "beta0 per layer, wrong count": ([*train, "--out", "r", "--beta0", "1,2,3"],
                                         "one per layer (2 layers), got 3 values"),
        "seed beyond int64": ([*train, "--out", "r", "--seed", str(2 ** 70)],
                              "seed must be an integer in [0, 2**63)"),
        "negative seed": ([*train, "--out", "r", "--seed", "-1"], "seed must be an integer"),
        "beta0 overflows float32": ([*train, "--out", "r", "--beta0", "1e39"],
                                    "beta0 must be finite in float32"),
        "empty expert names": ([*train, "--out", "r", "--experts", ","],
                               "experts must be non-empty names"),
        "window beyond the sequence": ([*train, "--out", "r", "--window", "1000"],
                                       "window must be < max_seq_len"),
        "lr inf": ([*train, "--out", "r", "--lr", "inf"], "lr must be a finite number"),
        "lr absurd": ([*train, "--out", "r", "--lr", "1e39"], "lr must be <= 1000"),
        "kl weight inf": ([*train, "--out", "r", "--kl-weight", "inf"], "kl_weight must be"),
        "checkpoint missing a field": (["evaluate", "missing-field"],
                                       "incomplete bayes-router checkpoint: missing "
                                       "['model_config']"),
        "resume a checkpoint missing a field": ([*train, "--out", "missing-field", "--resume"],
                                                "missing ['model_config']"),
        "checkpoint holding objects": (["evaluate", "pickle"], "refused unread"),
        "truncated checkpoint": (["evaluate", "truncated"], "not a readable bayes-router"),
        "resume without a checkpoint": ([*train, "--out", "data", "--resume"],
                                        "holds no checkpoint.pt"),
        "report of a missing run": (["report", "nowhere"], "nowhere does not exist"),
        "report into a file": (["report", "run", "--out", "afile"], "is a file"),
        "bench into a file": (["bench", "--out", "afile", "--seq-lens", "16"], "is a file"),
        **({} if torch.cuda.is_available() else {
            "cuda without CUDA": ([*train, "--out", "r", "--device", "cuda"],
                                  "device 'cuda': CUDA is not available on this machine")}),
        "unknown device": ([*train, "--out", "r", "--device", "tpu"],
                           "device must be one of auto, cpu, cuda"),
        "micro-batches not dividing the batch": ([*train, "--out", "r", "--micro-batches", "3"],
                                                 "micro_batches (3) must divide batch_size"),
        "gate threshold out of range": (["evaluate", "run", "--routing", "gated",
                                         "--gate-threshold", "2"], "gate_threshold must be"),
        "evaluate past max_seq_len": (["evaluate", "run", "--seq-len", "33"],
                                      "seq_len 33 is past the model's max_seq_len=32"),
        "generate no new token": (["generate", "run", "--max-new-tokens", "0"],
                                  "max_new_tokens must be an integer >= 1, got 0"),
        "generate gated without a threshold": (["generate", "run", "--routing", "gated"],
                                               "gate_threshold must be a number in [0, 1] "
                                               "(normalised uncertainty) for gated routing, "
                                               "got None"),
        "generate gate threshold out of range": (["generate", "run", "--routing", "gated",
                                                  "--gate-threshold", "2"],
                                                 "gate_threshold must be a number in [0, 1]"),
        "generate a threshold without the gate": (["generate", "run", "--gate-threshold", "0.5"],
                                                  "applies to gated routing only"),
        "generate unknown characters": (["generate", "run", "--prompt", "caf\u00e9 \u20ac\r"],
                                        "outside the run's vocabulary: 'é', '€', '\\r'"),
        "generate an empty prompt": (["generate", "run", "--prompt", ""], "the prompt is empty"),
        "generate past max_seq_len": (["generate", "run", "--prompt-len", "30",
                                       "--max-new-tokens", "10"], "it supports 32"),
        "generate a batch of 0": (["generate", "run", "--batch", "0"],
                                  "batch must be an integer >= 1"),
        "generate into a file": (["generate", "run", "--out", "afile"], "is a file"),
        **{f"phase1 reusing a config.json that is {name}":
           (["phase1", "--corpus", corpus, *TINY, "--seeds", "1", "--routers", "bayesian",
             "--out", f"phase1-{name}"], f"phase1-{name}/bayesian-seed0/config.json")
           for name in ("empty", "list", "model5", "cut")},
        **{f"sweep reusing a config.json that is {name}":
           (["sweep-beta0", "--corpus", corpus, *TINY, "--seeds", "1", "--values", "1",
             "--out", f"sweep-{name}"], f"sweep-{name}/beta0=1/seed0/config.json")
           for name in ("empty", "list", "model5", "cut")},
    }


CASE_NAMES = list(cases("c"))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_gets_one_clear_line(case, workspace, tiny_corpus, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    argv, fragment = cases(str(tiny_corpus))[case]
    before = sorted(p.relative_to(workspace) for p in workspace.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"bayes-router {argv[0]}: error: "), err
    assert fragment in errors[0], errors[0]
    after = sorted(p.relative_to(workspace) for p in workspace.rglob("*"))
    assert after == before  # a refused command writes nothing


def test_an_unknown_dtype_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dtype", "half", "--out", "r"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype: invalid choice: 'half'" in err
    assert all(name in err for name in ("float32", "bfloat16", "float16"))


def test_global_options_are_accepted_after_the_subcommand(capsys):
    assert main(["data", "--corpus", "synthetic:recall", "--threads", "1", "-v"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "synthetic:recall"


def test_the_entry_point_exits_with_a_usage_status_in_a_fresh_process(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = subprocess.run([sys.executable, "-m", "bayes_router", "bench", "--out",
                             str(tmp_path / "afile")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bayes-router bench: error:")


def test_a_file_system_refusal_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError the checks could not foresee (here: the disk refusing a write) names the file."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "data.json"))

    monkeypatch.setattr("bayes_router.experiments.corpus_report.write_json", refuse)
    code = main(["data", "--corpus", "synthetic:recall", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip() == f"bayes-router data: error: {tmp_path / 'out' / 'data.json'}: " \
                          "Permission denied (-v shows the traceback)"


def test_every_option_has_help_text_and_shows_its_default():
    import argparse

    from bayes_router.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{name} {action.option_strings or action.dest}"
            for name, p in sub.choices.items() for action in p._actions
            if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not bare, bare
    assert "(default: 0.003)" in sub.choices["train"].format_help().replace("\n", " ")
