"""Run directories: train_run outputs, evaluate_run under every mode, corpus reports."""

import json

import pytest
import torch

from bayes_router.data.tokens import TokenData
from bayes_router.experiments.corpus_report import corpus_report
from bayes_router.experiments.run_evaluation import decode_timing, evaluate_run
from bayes_router.experiments.run_loading import load_run_dir
from bayes_router.experiments.training_runs import train_run
from bayes_router.inference.timing import DECODE_STEPS
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.prior_free import PriorFreeRoutedLM


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("run")
    corpus = tiny_corpus
    model_cfg = TinyLMConfig(vocab_size=98, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                             window=4, chunk_size=8, controller_hidden=8)
    train_cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, eval_every=4, eval_batches=1,
                            checkpoint_every=4, dataset=str(corpus), dataset_max_chars=None)
    train_run(model_cfg, train_cfg, root / "run", progress=False, eval_batches=2)
    return root / "run"


def test_train_run_writes_every_output(run_dir):
    for name in ("config.json", "checkpoint.pt", "metrics.json", "history.json", "report.md",
                 "training.png"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"soft", "hard", "timing", "costs", "steps"}
    timing = metrics["timing"]
    assert timing["time_ratio"] > 0  # the prefill, beside the decoding step
    for key in ("decode_step_ms", "decode_full_only_step_ms", "decode_time_ratio"):
        assert timing[key] > 0, key
    # the longest context max_seq_len = 32 leaves for the steps
    assert timing["decode_context"] == 32 - DECODE_STEPS
    assert (timing["decode_steps"], timing["decode_reference"]) == (DECODE_STEPS, "full")
    assert f"decoding step at context {32 - DECODE_STEPS}" in (run_dir / "report.md").read_text()
    assert metrics["steps"] == 4 and metrics["hard"]["projected_flop_cost"] > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["versions"]["torch"]
    assert config["gradient_bias"] is None and metrics["gradient_bias"] is None  # no gating


def test_train_run_refuses_to_overwrite(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="already holds a run"):
        train_run(TinyLMConfig.from_dict(config["model"]),
                  TrainConfig.from_dict(config["train"]), run_dir, progress=False)


@pytest.mark.parametrize("mode,threshold", [("soft", None), ("hard", None), ("gated", 0.9)])
def test_evaluate_run(run_dir, mode, threshold):
    metrics = evaluate_run(run_dir, mode=mode, gate_threshold=threshold, max_batches=1)
    assert metrics["mode"] == mode and metrics["val_nll"] > 0
    tag = f"val_{mode}" + ("_0.9" if mode == "gated" else "")
    for name in (f"metrics_{tag}.json", f"evaluation_{tag}.md", f"expert_share_{tag}.png"):
        assert (run_dir / name).exists()
    if mode == "gated":
        assert 0.0 <= metrics["hard_fraction"] <= 1.0
    timing = metrics["timing"]
    assert timing["mode"] == mode and timing["decode_context"] == 32 - DECODE_STEPS
    assert timing["decode_time_ratio"] > 0 and timing["decode_step_ms"] > 0
    saved = json.loads((run_dir / f"metrics_{tag}.json").read_text())["timing"]
    assert saved["decode_full_only_step_ms"] > 0
    assert (f"| decoding step / full-only, context {32 - DECODE_STEPS} |"
            in (run_dir / f"evaluation_{tag}.md").read_text())


def test_evaluations_of_other_splits_and_thresholds_do_not_overwrite(run_dir):
    val = evaluate_run(run_dir, mode="soft", max_batches=1)
    saved = (run_dir / "metrics_val_soft.json").read_text()
    evaluate_run(run_dir, mode="soft", split="test", max_batches=1)
    evaluate_run(run_dir, mode="gated", gate_threshold=0.5, max_batches=1)
    evaluate_run(run_dir, mode="gated", gate_threshold=0.7, max_batches=1)
    assert (run_dir / "metrics_val_soft.json").read_text() == saved
    assert json.loads((run_dir / "metrics_test_soft.json").read_text())["test_nll"] > 0
    assert (run_dir / "metrics_val_gated_0.5.json").exists()
    assert (run_dir / "evaluation_val_gated_0.7.md").exists()
    assert val["val_nll"] > 0


@pytest.mark.usefixtures("local_params")
def test_a_run_times_decoding_in_the_longest_windows_its_split_holds():
    model = PriorFreeRoutedLM(TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2,
                                           max_seq_len=16, window=4, chunk_size=4,
                                           controller_hidden=8))
    stream = torch.arange(40) % 11
    data = TokenData("toy", {"train": stream, "val": stream, "test": stream[:12]}, 11)
    long = decode_timing(model, data, "val", seq_len=8, mode="hard", repeats=1)
    assert (long["decode_context"], long["decode_steps"]) == (16 - DECODE_STEPS, DECODE_STEPS)
    # 12 tokens hold no window of max_seq_len + 1 = 17: windows of seq_len = 8, so 7 steps
    short = decode_timing(model, data, "test", seq_len=8, mode="hard", repeats=1)
    assert (short["decode_context"], short["decode_steps"]) == (1, 7)
    assert short["decode_time_ratio"] > 0


@pytest.fixture(scope="module")
def rotary_run_dir(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("rotary")
    model_cfg = TinyLMConfig(vocab_size=98, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                             window=4, chunk_size=8, controller_hidden=8, positions="rotary")
    train_cfg = TrainConfig(router="fixed:0.25,0.5,0.25", steps=2, batch_size=4, seq_len=32,
                            eval_every=2, eval_batches=1, checkpoint_every=2,
                            dataset=str(tiny_corpus), dataset_max_chars=None)
    train_run(model_cfg, train_cfg, root / "run", progress=False, eval_batches=1)
    return root / "run"


@pytest.mark.usefixtures("local_params")
def test_a_rotary_run_is_evaluated_and_timed_past_its_training_length(rotary_run_dir):
    """Windows of 80 tokens for a run trained on 32: the NLL is that of the model on those
    windows (computed here by hand), the decoding step is timed at their context, and the files
    carry the length in their tag."""
    metrics = evaluate_run(rotary_run_dir, mode="hard", max_batches=1, seq_len=80)
    assert metrics["seq_len"] == 80
    assert metrics["timing"]["decode_context"] == 80 - DECODE_STEPS
    assert (rotary_run_dir / "metrics_val_hard_T80.json").exists()
    assert "tokens in windows of 80." in (rotary_run_dir / "evaluation_val_hard_T80.md").read_text()
    model, _, _, _, data = load_run_dir(rotary_run_dir)
    x, y = next(data.eval_batches("val", 16, 80))
    with torch.no_grad():
        logits = model.predict(x, "hard").logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    assert metrics["val_nll"] == pytest.approx(float(nll), rel=1e-5)
    assert metrics["tokens"] == y.numel()
    # the training length keeps the plain tag
    evaluate_run(rotary_run_dir, mode="hard", max_batches=1, seq_len=32)
    assert (rotary_run_dir / "metrics_val_hard.json").exists()


@pytest.mark.usefixtures("local_params")
def test_evaluation_windows_past_what_the_model_or_split_reads_are_refused(run_dir,
                                                                         rotary_run_dir):
    with pytest.raises(ValueError, match="past the model's max_seq_len=32: learned positions"):
        evaluate_run(run_dir, seq_len=33)
    with pytest.raises(ValueError, match="longer than the val split allows"):
        evaluate_run(rotary_run_dir, seq_len=10**7)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        evaluate_run(rotary_run_dir, seq_len=1)
    assert not list(run_dir.glob("metrics_*_T33.json"))


def test_evaluate_run_needs_a_run_directory(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        evaluate_run(tmp_path)


def test_corpus_report(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    stats = corpus_report(str(corpus), tmp_path / "out")
    assert stats["chars"]["total"] == 600
    for name in ("data.json", "data.png", "report.md"):
        assert (tmp_path / "out" / name).exists()


def test_train_runs_in_parallel_match_serial_runs(tmp_path, tiny_corpus):
    from bayes_router.experiments.training_runs import train_runs

    model_cfg = TinyLMConfig(vocab_size=98, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                             window=4, chunk_size=8, controller_hidden=8)
    specs = [(model_cfg, TrainConfig(steps=3, batch_size=4, seq_len=32, eval_every=3,
                                     eval_batches=1, checkpoint_every=3, dataset=str(tiny_corpus),
                                     dataset_max_chars=None, router=router), tmp_path / router)
             for router in ("fixed:full", "prior-free")]
    parallel = train_runs(specs, jobs=2, progress=False, eval_batches=1)
    serial = train_runs([(m, t, tmp_path / "serial" / d.name) for m, t, d in specs], jobs=1,
                        progress=False, eval_batches=1)
    for a, b in zip(parallel, serial, strict=True):
        assert a["router"] == b["router"]
        assert a["soft"]["val_nll"] == pytest.approx(b["soft"]["val_nll"], rel=1e-4)
    # finished runs are reused, not retrained
    mtime = (tmp_path / "prior-free" / "metrics.json").stat().st_mtime
    train_runs(specs, jobs=2, progress=False, eval_batches=1)
    assert (tmp_path / "prior-free" / "metrics.json").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="jobs"):
        train_runs(specs, jobs=0)


def test_a_run_finds_its_relative_corpus_from_any_directory_and_notices_changes(
        tmp_path, monkeypatch, caplog):
    from bayes_router.experiments.run_loading import load_run_dir
    from tests.conftest import TINY_TEXT

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "corpus.txt").write_text(TINY_TEXT)
    monkeypatch.chdir(tmp_path / "work")
    model_cfg = TinyLMConfig(vocab_size=98, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                             window=4, chunk_size=8, controller_hidden=8)
    train_cfg = TrainConfig(steps=2, batch_size=4, seq_len=32, eval_every=2, eval_batches=1,
                            checkpoint_every=2, dataset="corpus.txt", dataset_max_chars=None)
    train_run(model_cfg, train_cfg, tmp_path / "run", progress=False, eval_batches=1)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["corpus_path"] == str(tmp_path / "work" / "corpus.txt")
    assert len(config["corpus_sha256"]) == 64

    monkeypatch.chdir(tmp_path)  # "corpus.txt" no longer resolves from here
    with caplog.at_level("WARNING"):
        *_, data = load_run_dir(tmp_path / "run")
    assert data.fingerprint() == config["corpus_sha256"] and not caplog.records

    (tmp_path / "work" / "corpus.txt").write_text(TINY_TEXT.replace("fox", "cat"))
    with caplog.at_level("WARNING"):
        load_run_dir(tmp_path / "run")
    assert "has changed since this run was trained" in caplog.text


def test_a_checkpoint_that_disagrees_with_config_json_is_named(run_dir, tmp_path, caplog):
    import shutil

    from bayes_router.experiments.run_loading import load_run_dir

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["train"]["lr"] = 0.5  # as if checkpoint.pt came from another run
    (copy / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        load_run_dir(copy)
    assert "disagrees with config.json in ['train.lr']" in caplog.text
