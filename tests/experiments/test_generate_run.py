"""``bayes-router generate`` on tiny run directories: the files and their agreement with each
other, the prompts, the refusals, and the command line."""

import json

import numpy as np
import pytest

from bayes_router.cli import main
from bayes_router.data.tokens import token_data
from bayes_router.experiments.generate import generate_run
from bayes_router.experiments.training_runs import train_run
from bayes_router.inference.decoding import DecodeConfig
from tests.helpers import tiny_configs

FILES = ("generate.json", "routing.png", "report.md")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, tiny_corpus):
    """A Bayesian run on the tiny text corpus and one on a synthetic task (3 steps each)."""
    root = tmp_path_factory.mktemp("generate")
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=3)
    train_run(model_cfg, train_cfg, root / "text", progress=False, eval_batches=1,
              data=tiny_data)
    task = token_data("synthetic:recall", seq_len=32, window=4)
    model_cfg, train_cfg = tiny_configs(task, "synthetic:recall", steps=3)
    train_run(model_cfg, train_cfg, root / "synthetic", progress=False, eval_batches=1,
              data=task)
    return root


def _stored(out):
    return json.loads((out / "generate.json").read_text())


def test_hard_routing_from_validation_windows(runs, tmp_path, tiny_data):
    config = DecodeConfig(max_new_tokens=6, routing="hard", temperature=0.0)
    generate_run(runs / "text", tmp_path / "g", config, batch=2, prompt_len=8)
    assert all((tmp_path / "g" / name).is_file() for name in FILES)
    stored = _stored(tmp_path / "g")
    assert stored["config"] == {"max_new_tokens": 6, "routing": "hard", "gate_threshold": None,
                                "gate_measure": "total", "temperature": 0.0, "top_k": None,
                                "seed": 0}
    assert stored["router"] == stored["router_kind"] == "bayesian"
    assert stored["expert_names"] == ["full", "linear", "local"]
    val = tiny_data.splits["val"]
    for b, sequence in enumerate(stored["sequences"]):
        # the prompts: consecutive windows of 8 validation tokens, in order
        assert sequence["prompt_ids"] == val[8 * b:8 * (b + 1)].tolist()
        assert sequence["prompt_text"] == tiny_data.vocab.decode(val[8 * b:8 * (b + 1)])
        assert len(sequence["generated_ids"]) == 6
        assert sequence["generated_text"] == tiny_data.vocab.decode(sequence["generated_ids"])
        experts = np.array(sequence["experts"])
        assert experts.shape == (2, 14)  # layers x (8 prompt + 6 new tokens)
        assert (experts[:, -1] == -2).all()  # the last new token is sampled, never read
        assert ((experts[:, :-1] >= 0) & (experts[:, :-1] < 3)).all()  # hard: one expert each
        assert all(u is None for u in np.array(sequence["uncertainty"], dtype=object)[:, -1])
    assert stored["soft_fraction"] == 0.0
    steps = stored["step_seconds"]
    assert len(steps) == 5  # the first new token comes from the prefill
    assert stored["mean_step_ms"] == pytest.approx(1e3 * np.mean(steps))
    assert stored["tokens_per_second"] == pytest.approx(2 / np.mean(steps))
    assert stored["cache_bytes"] > 0
    assert stored["cache_bytes_per_sequence"] == stored["cache_bytes"] / 2
    # the shares, counted afresh from the per-token experts of both sequences
    codes = np.concatenate([np.array(s["experts"])[:, :-1] for s in stored["sequences"]], 1)
    for layer, share in enumerate(stored["expert_share"]):
        counted = [np.mean(codes[layer] == k) for k in range(3)] + [0.0]
        assert list(share) == ["full", "linear", "local", "soft"]
        np.testing.assert_allclose(list(share.values()), counted)
    report = (tmp_path / "g" / "report.md").read_text()
    assert "## Sequence 1" in report and "![routing along sequence 0](routing.png)" in report
    assert stored["sequences"][0]["generated_text"] in report


def test_soft_routing_of_a_text_prompt_repeated(runs, tmp_path, tiny_data):
    config = DecodeConfig(max_new_tokens=8, routing="soft", seed=3)
    result = generate_run(runs / "text", tmp_path / "g", config, prompt="the ", batch=3)
    stored = _stored(tmp_path / "g")
    assert stored["soft_fraction"] == result["soft_fraction"] == 1.0
    ids = tiny_data.vocab.encode("the ").tolist()
    for sequence in stored["sequences"]:
        assert sequence["prompt_ids"] == ids and sequence["prompt_text"] == "the "
        experts = np.array(sequence["experts"])
        assert (experts[:, :-1] == -1).all() and (experts[:, -1] == -2).all()
    # one prompt, three rows: the sampling makes them differ
    assert len({s["generated_text"] for s in stored["sequences"]}) > 1
    assert all(share["soft"] == 1.0 for share in stored["expert_share"])


def test_gated_routing_goes_soft_where_the_uncertainty_reaches_the_threshold(runs, tmp_path):
    # layer 0 decides the prompt's tokens from their embeddings alone, whatever the routing:
    # a threshold at the median of those decisions' uncertainty splits them
    prompt = "the quick "
    hard = generate_run(runs / "text", tmp_path / "hard", DecodeConfig(max_new_tokens=2),
                        prompt=prompt)
    first = np.array(hard["sequences"][0]["uncertainty"], dtype=np.float64)[0, :len(prompt)]
    threshold = float(np.median(first))
    config = DecodeConfig(max_new_tokens=10, routing="gated", gate_threshold=threshold)
    stored = generate_run(runs / "text", tmp_path / "g", config, prompt=prompt)
    experts = np.array(stored["sequences"][0]["experts"])[:, :-1]
    uncertainty = np.array(stored["sequences"][0]["uncertainty"], dtype=np.float64)[:, :-1]
    assert not np.isnan(uncertainty).any()
    np.testing.assert_array_equal(uncertainty[0, :len(prompt)], first)
    np.testing.assert_array_equal(experts == -1, uncertainty >= threshold)
    soft = experts[0, :len(prompt)] == -1
    assert soft.any() and not soft.all()
    assert stored["soft_fraction"] == pytest.approx(np.mean(uncertainty >= threshold))


def test_a_prompt_outside_the_vocabulary_is_refused_naming_the_characters(runs, tmp_path):
    config = DecodeConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the run's vocabulary: 'é', '€', '\\\\r'$"):
        generate_run(runs / "text", tmp_path / "g", config, prompt="caf\u00e9 \u20ac\t\r\n\u00e9")
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_run(runs / "text", tmp_path / "g", config, prompt="")
    for name, options in (("batch", dict(batch=0)), ("prompt_len", dict(prompt_len=0))):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            generate_run(runs / "text", tmp_path / "g", config, **options)
    with pytest.raises(ValueError, match="it supports 32"):  # 30 + 9 new tokens past max_seq_len
        generate_run(runs / "text", tmp_path / "g", DecodeConfig(max_new_tokens=10),
                     prompt_len=30)
    assert not (tmp_path / "g").exists()  # a refusal writes nothing


def test_a_synthetic_run_refuses_a_text_prompt_and_continues_its_sequences(runs, tmp_path):
    config = DecodeConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="synthetic task, whose tokens are not characters"):
        generate_run(runs / "synthetic", tmp_path / "g", config, prompt="abc")
    with pytest.raises(ValueError, match="longer than the validation sequences"):
        generate_run(runs / "synthetic", tmp_path / "g", config, prompt_len=40)
    stored = generate_run(runs / "synthetic", tmp_path / "g", config, batch=2, prompt_len=5)
    task = token_data("synthetic:recall", seq_len=32, window=4)
    for b, sequence in enumerate(stored["sequences"]):
        assert sequence["prompt_ids"] == task.splits["val"][0][b, :5].tolist()
        assert sequence["prompt_text"] is None and len(sequence["generated_ids"]) == 4
    assert "Prompt ids:" in (tmp_path / "g" / "report.md").read_text()


def test_the_command_prints_the_text_and_writes_into_the_run(runs, tmp_path, capsys):
    assert main(["generate", str(runs / "text"), "--prompt", "the ", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    stored = _stored(runs / "text" / "generate")
    assert out.splitlines()[0] == stored["sequences"][0]["generated_text"]
    assert "tokens/s" in out and f"wrote {runs / 'text' / 'generate'}/generate.json" in out
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the lazy\n", encoding="utf-8")
    assert main(["generate", str(runs / "text"), "--prompt-file", str(prompt), "--batch", "2",
                 "--routing", "gated", "--gate-threshold", "0.5", "--top-k", "5",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    stored = _stored(tmp_path / "g")
    assert [s["prompt_text"] for s in stored["sequences"]] == ["the lazy\n"] * 2
    assert stored["config"]["gate_threshold"] == 0.5 and stored["config"]["top_k"] == 5
    assert "--- sequence 1 ---" in out
    # one new token: it comes from the prefill, no step is timed (strict JSON: null, not NaN)
    assert main(["generate", str(runs / "text"), "--prompt", "a", "--max-new-tokens", "1",
                 "--out", str(tmp_path / "one"), "--seed", "1"]) == 0
    assert "no decoding step timed" in capsys.readouterr().out
    stored = _stored(tmp_path / "one")
    assert stored["step_seconds"] == [] and stored["tokens_per_second"] is None
    assert stored["mean_step_ms"] is None and len(stored["sequences"][0]["generated_ids"]) == 1


def test_the_command_refuses_a_prompt_file_that_is_not_utf8(runs, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"caf\xe9")
    assert main(["generate", str(runs / "text"), "--prompt-file", str(prompt),
                 "--out", str(tmp_path / "g")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert main(["generate", str(runs / "text"), "--prompt-file", str(tmp_path / "none"),
                 "--out", str(tmp_path / "g")]) == 2
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        main(["generate", str(runs / "text"), "--prompt", "a", "--prompt-file", str(prompt)])
