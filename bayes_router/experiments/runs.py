"""Run directories: train a routed LM into a folder, evaluate it, and write its report.

A run directory holds ``config.json`` (configurations, seed, versions), ``checkpoint.pt``,
``history.json`` (the loss trace), ``metrics.json`` (held-out metrics under soft and hard routing,
the timed hard-routing forward pass and decoding step, each against full-only), ``training.png``
and ``report.md``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import bayes_router
from bayes_router.analysis.plots import plot_expert_share
from bayes_router.analysis.study_plots import (
    plot_shares,
    plot_training_loss,
    plot_training_terms,
    plot_validation,
    save_figure,
)
from bayes_router.core.precision import dtype_name, resolve_dtype
from bayes_router.data import corpus_statistics, load_corpus
from bayes_router.data.tokens import TokenData, token_data
from bayes_router.experiments.rundir import run_lock
from bayes_router.inference.build import check_compatible, load_trained
from bayes_router.inference.checkpoint import CHECKPOINT_NAME, config_differences
from bayes_router.inference.distributed import Distributed, resolve_device
from bayes_router.inference.evaluate import (
    bits_label,
    evaluate,
    heldout_objective,
    timed_decode,
    timed_forward,
)
from bayes_router.inference.timing import DECODE_STEPS
from bayes_router.inference.train import TrainingDiverged, train
from bayes_router.inference.train_config import TrainConfig, gated_training_bias, objective_label
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.routed_lm import RoutedLM

logger = logging.getLogger(__name__)

RUN_FILES = ("config.json", CHECKPOINT_NAME, "metrics.json")
#: Validation batches (of 16 windows) behind metrics.json and the analysis report alike.
EVAL_BATCHES = 32


def versions() -> dict:
    """Versions of the libraries a result depends on."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "pyro": pyro.__version__, "numpy": np.__version__,
            "bayes_router": getattr(bayes_router, "__version__", "unknown"),
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def json_safe(value):
    """``value`` with arrays as lists, paths as strings and NaN or infinite floats as ``None``
    (strict JSON)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data) -> None:
    """Write strict JSON through a temporary file and a rename: a reader never sees half a
    file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def load_data(train_cfg: TrainConfig, model_cfg: TinyLMConfig | None = None) -> TokenData:
    """The corpus a training configuration names (synthetic tasks sized to the run)."""
    options = {}
    if train_cfg.dataset.startswith("synthetic:"):
        options = {"seq_len": train_cfg.seq_len}
        if model_cfg is not None:
            options["window"] = model_cfg.window
    return token_data(train_cfg.dataset, max_chars=train_cfg.dataset_max_chars,
                      seed=train_cfg.seed, **options)


def corpus_path(spec: str) -> str | None:
    """The absolute path a corpus spec names (``None`` for ``stdlib`` and synthetic tasks)."""
    if spec == "stdlib" or spec.startswith("synthetic:"):
        return None
    return str(Path(spec).resolve())


def load_run(run_dir: Path, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = "float32"
             ) -> tuple[RoutedLM, TinyLMConfig, TrainConfig, dict, TokenData]:
    """The trained model of a run directory (computing in ``dtype``, see
    :func:`~bayes_router.inference.build.load_trained`), its configurations, checkpoint and data.

    The checkpoint is the source of truth; a warning says when ``config.json`` disagrees with
    it (a checkpoint copied in from another run) or when the corpus has changed since training
    (its fingerprint differs). A run trained on a relative ``--corpus`` path finds it through
    the resolved path it recorded, from any working directory.
    """
    run_dir = Path(run_dir)
    model, model_cfg, train_cfg, payload = load_trained(run_dir, device, dtype)
    config = {}
    try:
        config = read_json(run_dir / "config.json")
        saved_model, saved_train = read_run_config(run_dir, config)
        differ = (config_differences(saved_model, model_cfg, "model.")
                  + [k for k in config_differences(saved_train, train_cfg, "train.")
                     if k != "train.steps"])
        if differ:
            logger.warning("%s: the checkpoint disagrees with config.json in %s (a checkpoint "
                           "of another run?); using the checkpoint's configuration", run_dir,
                           differ)
    except (OSError, ValueError) as error:
        logger.warning("%s: config.json cannot be used (%s); using the checkpoint's "
                       "configuration", run_dir, error)
    recorded = config.get("corpus_path")
    if recorded and Path(recorded).exists():  # the file it trained on, from any directory
        train_cfg = dataclasses.replace(train_cfg, dataset=recorded)
    data = load_data(train_cfg, model_cfg)
    if config.get("corpus_sha256") and config["corpus_sha256"] != data.fingerprint():
        logger.warning("%s: the corpus %s has changed since this run was trained on it (its "
                       "fingerprint differs); the results describe the data as it is now",
                       run_dir, train_cfg.dataset)
    return model, model_cfg, train_cfg, payload, data


def check_run_dir(run_dir: Path) -> Path:
    """The run directory if it holds every file an analysis needs, else a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    missing = [name for name in RUN_FILES if not (run_dir / name).exists()]
    if missing:
        raise ValueError(f"{run_dir} is not a finished run directory: missing {missing} "
                         "(train one with `bayes-router train --out DIR`)")
    return run_dir


def decode_timing(model: RoutedLM, data: TokenData, split: str, seq_len: int, mode: str,
                  gate_threshold: float | None = None, repeats: int = 5,
                  gate_measure: str = "total") -> dict:
    """:func:`~bayes_router.inference.evaluate.timed_decode` on the first 8 windows of
    ``split``, as long as the model reads (``max_seq_len`` tokens; windows of ``seq_len`` where
    the split is too short for one), at the longest context they leave for
    :data:`~bayes_router.inference.timing.DECODE_STEPS` steps after it (fewer steps in windows
    shorter than that); ``{}`` for windows of a single token."""
    try:
        x, _ = next(data.eval_batches(split, 8, model.cfg.max_seq_len))
    except ValueError:  # the split holds no window that long
        x, _ = next(data.eval_batches(split, 8, seq_len))
    length = min(x.shape[1], model.cfg.max_seq_len)
    if length < 2:
        logger.warning("no decoding timing: the %s windows hold %d token(s)", split, length)
        return {}
    steps = min(DECODE_STEPS, length - 1)
    return timed_decode(model, x, mode=mode, gate_threshold=gate_threshold,
                        context=length - steps, steps=steps, repeats=repeats,
                        gate_measure=gate_measure)


def final_metrics(model, data: TokenData, train_cfg: TrainConfig, eval_batches: int | None,
                  gate_threshold: float | None = None, timing_repeats: int = 5) -> dict:
    """Held-out metrics in soft and hard mode (and gated, if a threshold is given), and the
    timed hard-routing forward pass and decoding step."""
    metrics = {}
    modes = ["soft", "hard"] + (["gated"] if gate_threshold else [])
    for mode in modes:
        metrics[mode] = evaluate(model, data, "val", train_cfg.seq_len, mode=mode,
                                 gate_threshold=gate_threshold if mode == "gated" else None,
                                 max_batches=eval_batches)
    metrics["elbo"] = heldout_objective(model, data, "val", train_cfg.seq_len,
                                        max_batches=eval_batches)
    x, _ = next(data.eval_batches("val", 8, train_cfg.seq_len))
    metrics["timing"] = timed_forward(model, x, mode="hard", repeats=timing_repeats)
    metrics["timing"].update(decode_timing(model, data, "val", train_cfg.seq_len, "hard",
                                           repeats=timing_repeats))
    return metrics


def train_run(model_cfg: TinyLMConfig, train_cfg: TrainConfig, out_dir: Path,
              resume: bool = False, progress: bool = True, eval_batches: int | None = EVAL_BATCHES,
              data: TokenData | None = None, device: str | torch.device = "cpu") -> dict | None:
    """Train into ``out_dir`` and write config, history, metrics, figure and report, holding
    the folder's write lock (:func:`~bayes_router.experiments.rundir.run_lock`) throughout.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process trains its share of each batch and
    rank 0 alone takes the lock and writes; the other ranks return ``None``.

    :raises ValueError: if ``out_dir`` already holds a run and ``resume`` is false (nothing is
        overwritten).
    :raises OutputBusy: if another process is writing into ``out_dir``.
    """
    check_compatible(model_cfg, train_cfg)  # before anything is written
    device = resolve_device(device)
    group = Distributed.from_environment(device)
    if not group.is_main:
        data = load_data(train_cfg, model_cfg) if data is None else data
        train(model_cfg, train_cfg, data, out_dir=Path(out_dir), resume=resume,
              progress=False, device=device, distributed=group)
        return None
    with run_lock(out_dir):
        return _train_run(model_cfg, train_cfg, Path(out_dir), resume, progress, eval_batches,
                          data, device, group)


def _train_run(model_cfg, train_cfg, out_dir, resume, progress, eval_batches, data, device,
               group) -> dict:
    if (out_dir / CHECKPOINT_NAME).exists() and not resume:
        raise ValueError(f"{out_dir} already holds a run; pass resume=True (--resume) to "
                         "continue it or choose another directory")
    data = load_data(train_cfg, model_cfg) if data is None else data
    config = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
              "seed": train_cfg.seed, "corpus": data.name,
              "corpus_path": corpus_path(train_cfg.dataset),
              "corpus_sha256": data.fingerprint(), "versions": versions(),
              "device": str(device), "world_size": group.world_size,
              "global_batch": train_cfg.batch_size,
              "gradient_bias": gated_training_bias(train_cfg),
              "objective": objective_label(train_cfg)}
    if not resume:
        write_json(out_dir / "config.json", config)
    try:
        result = train(model_cfg, train_cfg, data, out_dir=out_dir, resume=resume,
                       progress=progress, device=device, distributed=group)
    except TrainingDiverged as error:
        write_json(out_dir / "diverged.json", {"step": error.step, "quantity": error.quantity,
                                               "value": error.loss, "detail": error.detail,
                                               "message": str(error),
                                               "checkpoint": error.checkpoint})
        raise
    write_json(out_dir / "config.json", config)  # a resumed run records its new step count
    write_json(out_dir / "history.json", {"history": result.history,
                                          "evaluations": result.evaluations})
    metrics = final_metrics(result.model, data, train_cfg, eval_batches)
    metrics.update({"router": train_cfg.router, "steps": result.step,
                    "train_seconds": result.seconds,
                    "final_loss": result.history[-1]["loss"] if result.history else None,
                    "costs": result.model.costs.tolist(),
                    "gradient_bias": config["gradient_bias"], "objective": config["objective"]})
    if getattr(result.model, "learn_beta0", False):
        metrics["beta0"] = result.model.beta0.detach().tolist()
    write_json(out_dir / "metrics.json", metrics)
    plot_training(result.history, result.evaluations, out_dir / "training.png")
    (out_dir / "report.md").write_text(run_report(config, metrics, result.evaluations))
    return metrics


def finished_metrics(run_dir: Path, model_cfg: TinyLMConfig, train_cfg: TrainConfig
                     ) -> dict | None:
    """The metrics of a finished run of exactly this configuration in ``run_dir``, ``None`` if
    it holds no finished run.

    :raises ValueError: if it holds a run (finished or not) of another configuration (a
        partial run may differ in ``steps`` only).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        return None
    saved_model, saved_train = read_run_config(run_dir)
    # through the dataclasses, so that fields added since the run was written take defaults
    differ = (config_differences(saved_model, model_cfg, "model.")
              + config_differences(saved_train, train_cfg, "train."))
    finished = (run_dir / "metrics.json").exists()
    if differ and (finished or differ != ["train.steps"]):
        raise ValueError(f"{run_dir} holds a run with another configuration (fields "
                         f"{differ}); choose another --out directory")
    return read_json(run_dir / "metrics.json", dict) if finished else None


def read_json(path: Path, kind: type = dict):
    """A JSON file of ours, parsed, with a clear error naming the file if it is not valid JSON
    or not a ``kind`` at the top level."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, "
                         f"column {error.colno}); it may be truncated: delete it or choose "
                         f"another folder") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (UTF-8 JSON) file") from None
    if not isinstance(data, kind):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected a "
                         f"{kind.__name__}")
    return data


def read_run_config(run_dir: Path, config: dict | None = None
                    ) -> tuple[TinyLMConfig, TrainConfig]:
    """The model and training configurations of a run's ``config.json`` (``config``: its
    contents, when the caller has read them already).

    :raises ValueError: naming the file, if it does not parse or lacks a valid ``model`` or
        ``train`` configuration.
    """
    path = Path(run_dir) / "config.json"
    config = read_json(path, dict) if config is None else config
    parts = []
    for key, cls in (("model", TinyLMConfig), ("train", TrainConfig)):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{path} is not a run configuration: its {key!r} entry should be "
                             f"an object of {cls.__name__} fields, got {config.get(key)!r}")
        try:
            parts.append(cls.from_dict(config[key]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: invalid {key!r} configuration: {error}") from None
    return parts[0], parts[1]


def _init_worker() -> None:
    torch.set_num_threads(1)


def _train_worker(model_cfg, train_cfg, run_dir, resume, eval_batches, device) -> dict:
    return train_run(model_cfg, train_cfg, run_dir, resume=resume, progress=False,
                     eval_batches=eval_batches, device=device)


def train_runs(specs: list[tuple[TinyLMConfig, TrainConfig, Path]], jobs: int = 1,
               progress: bool = True, resume: bool = True, data: TokenData | None = None,
               eval_batches: int | None = EVAL_BATCHES, device: str = "cpu") -> list[dict]:
    """Train every ``(model_cfg, train_cfg, run_dir)`` and return their metrics, in order.

    Finished runs of the same configuration are reused and interrupted ones resumed (with
    ``resume``); ``jobs > 1`` trains in that many spawned processes of one torch thread each
    (they load their own data).

    :raises ValueError: for ``jobs < 1`` or a run directory holding another configuration.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("phase1 and sweep-beta0 do not run under torchrun: they train many "
                         "small runs, in parallel with --jobs; use torchrun for one large "
                         "`bayes-router train`")
    results: list[dict | None] = []
    todo = []
    for i, (model_cfg, train_cfg, run_dir) in enumerate(specs):
        done = finished_metrics(run_dir, model_cfg, train_cfg) if resume else None
        if done is not None:
            logger.info("reusing finished run %s", run_dir)
        else:
            partial = resume and (Path(run_dir) / CHECKPOINT_NAME).exists()
            todo.append((i, model_cfg, train_cfg, Path(run_dir), partial))
        results.append(done)
    bar = tqdm(total=len(todo), disable=not progress or not todo, desc="runs",
               dynamic_ncols=True)
    if jobs == 1 or len(todo) <= 1:
        for i, model_cfg, train_cfg, run_dir, partial in todo:
            bar.set_postfix(run=run_dir.name)
            results[i] = train_run(model_cfg, train_cfg, run_dir, resume=partial,
                                   progress=False, eval_batches=eval_batches,
                                   data=data, device=device)
            bar.update(1)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(todo)), mp_context=context,
                                                    initializer=_init_worker) as pool:
            futures = {pool.submit(_train_worker, model_cfg, train_cfg, run_dir, partial,
                                   eval_batches, device): i
                       for i, model_cfg, train_cfg, run_dir, partial in todo}
            bar.set_postfix_str(f"{min(jobs, len(todo))} workers")
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                bar.set_postfix_str(f"finished {Path(specs[i][2]).name}")
                bar.update(1)
    bar.close()
    return results


def evaluate_run(run_dir: Path, mode: str = "soft", gate_threshold: float | None = None,
                 split: str = "val", max_batches: int | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
                 ) -> dict:
    """Evaluate a trained run under a routing ``mode`` on ``split``, computing in ``dtype``;
    writes ``metrics_<tag>.json``, ``evaluation_<tag>.md`` and ``expert_share_<tag>.png`` with
    the tag ``<split>_<mode>`` (``<split>_gated_<threshold>`` for gated routing, ``_<dtype>``
    appended below float32), so evaluations of different splits, modes, thresholds or
    precisions never overwrite each other."""
    run_dir = check_run_dir(run_dir)
    dtype = dtype_name(resolve_dtype(dtype))  # "bfloat16" for torch.bfloat16 too
    with pyro.settings.context(module_local_params=True):
        model, model_cfg, train_cfg, _, data = load_run(run_dir, device, dtype)
        metrics = evaluate(model, data, split, train_cfg.seq_len, mode=mode,
                           gate_threshold=gate_threshold, max_batches=max_batches,
                           progress=True)
        if mode == "soft":
            metrics["elbo"] = heldout_objective(model, data, split, train_cfg.seq_len,
                                                max_batches=max_batches)
        x, _ = next(data.eval_batches(split, 8, train_cfg.seq_len))
        metrics["timing"] = timed_forward(model, x, mode=mode, gate_threshold=gate_threshold)
        metrics["timing"].update(decode_timing(model, data, split, train_cfg.seq_len, mode,
                                               gate_threshold))
    metrics["dtype"] = dtype
    tag = evaluation_tag(split, mode, gate_threshold) + ("" if dtype == "float32" else f"_{dtype}")
    write_json(run_dir / f"metrics_{tag}.json", metrics)
    _evaluation_report(run_dir, metrics, mode, split, model.cfg.experts, tag)
    return metrics


def evaluation_tag(split: str, mode: str, gate_threshold: float | None = None) -> str:
    """``val_soft``, ``test_hard``, ``val_gated_0.5``: the suffix of an evaluation's files."""
    return f"{split}_{mode}" + (f"_{gate_threshold:g}" if mode == "gated" else "")


def _evaluation_report(run_dir: Path, metrics: dict, mode: str, split: str, experts,
                       tag: str) -> None:
    fig = Figure(figsize=(4.5, 3.2))
    ax = plot_expert_share(np.asarray(metrics["expert_share"]), ax=fig.add_subplot(),
                           expert_names=experts)
    ax.set_title(f"expert share ({mode} routing)")
    save_figure(fig, run_dir / f"expert_share_{tag}.png")
    t = metrics["timing"]
    lines = [f"# Evaluation: {mode} routing on the {split} split", "",
             "| metric | value |", "|---|---|",
             f"| {split} NLL (nats/token) | {metrics[f'{split}_nll']:.4f} |",
             f"| {split} {bits_label(metrics)} | {metrics[f'{split}_bpc']:.4f} |",
             f"| projected FLOP cost (%) | {metrics['projected_flop_cost']:.1f} |",
             f"| expected FLOP cost (%) | {metrics['expected_flop_cost']:.1f} |",
             f"| routing entropy (%) | {metrics['routing_entropy']:.1f} |"]
    if "hard_fraction" in metrics:
        lines.append(f"| tokens routed hard | {100 * metrics['hard_fraction']:.1f} % |")
    lines.append(f"| forward time / full-only | {_fmt(t['time_ratio'], 2)} |")
    if t.get("decode_time_ratio") is not None:
        lines.append(f"| decoding step / {t['decode_reference']}-only, context "
                     f"{t['decode_context']} | {_fmt(t['decode_time_ratio'], 2)} |")
    lines += ["", f"{metrics['tokens']} tokens. ![expert share](expert_share_{tag}.png)", ""]
    if "oracle" in metrics:
        lines += oracle_table(metrics["oracle"]) + [""]
    (run_dir / f"evaluation_{tag}.md").write_text("\n".join(lines))


def corpus_report(spec: str, out_dir: Path, max_chars: int | None = None,
                  **corpus_options) -> dict:
    """Statistics of a corpus into ``out_dir``: ``data.json``, ``data.png``, ``report.md``
    (``corpus_options``: ``seed`` and a synthetic task's ``seq_len``, ``window``, ...)."""
    stats = corpus_statistics(load_corpus(spec, max_chars=max_chars, **corpus_options),
                              top_k=30)
    stats["max_chars"] = max_chars
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "data.json", stats)
    if stats["kind"] == "text":
        labels = ["space" if c == " " else repr(c)[1:-1] for c, _ in stats["top_characters"]]
        shares = [p for _, p in stats["top_characters"]]
        title = "most frequent characters"
    else:
        labels, shares = list(stats["oracle_label_share"]), list(
            stats["oracle_label_share"].values())
        title = "oracle label share of the targets"
    fig = Figure(figsize=(9, 3))
    plot_shares(labels, shares, ax=fig.add_subplot(), title=f"{stats['name']}: {title}")
    save_figure(fig, out_dir / "data.png")
    lines = [f"# Corpus `{stats['name']}`", "", "```json",
             json.dumps({k: v for k, v in stats.items()
                         if k not in ("top_characters", "top_tokens")}, indent=2),
             "```", "", "![corpus](data.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return stats


def plot_training(history: list[dict], evaluations: list[dict], path: Path) -> None:
    """The objective and its parts (NLL, KL per layer and the KL weight, posterior-mean spread
    and mean ``a0``) and the validation bits per character of a run."""
    fig = Figure(figsize=(13, 6.4))
    axes = fig.subplots(2, 3)
    plot_training_loss(history, ax=axes[0, 0])
    ax = plot_validation(evaluations, ax=axes[0, 1])
    if evaluations:
        ax.set_ylabel(f"val {bits_label(evaluations[-1])}")
        ax.set_title(f"validation ({evaluations[-1]['tokens']} tokens per evaluation)")
    plot_training_terms(history, axes=(axes[0, 2], axes[1, 0], axes[1, 1], axes[1, 2]))
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def oracle_table(oracle: dict) -> list[str]:
    """Markdown rows of :func:`~bayes_router.inference.evaluate.oracle_metrics`."""
    layers = max((len(e["agreement"]) for e in oracle.values() if e.get("agreement")),
                 default=0)
    lines = ["| oracle label | share of targets | NLL (nats) | accuracy | "
             + " | ".join(f"routing agreement layer {i}" for i in range(layers)) + " |",
             "|---|---|---|---|" + "---|" * layers]
    for name, e in oracle.items():
        agreement = e.get("agreement")
        cells = ([f"{100 * a:.1f} %" for a in agreement] if agreement
                 else ["—"] * layers)
        lines.append(f"| {name} | {100 * e['share']:.1f} % | {e['nll']:.3f} | "
                     f"{100 * e['accuracy']:.1f} % | " + " | ".join(cells) + " |")
    return lines


def decode_sentence(timing: dict) -> str:
    """The timed decoding step of a run's ``timing`` metrics, one sentence ('' if untimed)."""
    if timing.get("decode_time_ratio") is None:
        return ""
    return (f" A decoding step at context {timing['decode_context']} (batch "
            f"{timing['decode_batch']}, {timing['decode_steps']} teacher-forced steps per timed "
            f"call): {timing['decode_step_ms']:.2f} ms vs "
            f"{timing['decode_full_only_step_ms']:.2f} ms {timing['decode_reference']}-only "
            f"(ratio {timing['decode_time_ratio']:.2f}).")


def run_report(config: dict, metrics: dict, evaluations: list[dict] | None = None) -> str:
    """A short markdown report of one run (``evaluations``: its periodic validations, whose
    size the report relates to the final table's)."""
    bits = bits_label(metrics["soft"])
    lines = [f"# Run: {metrics['router']} router", "",
             f"Corpus `{config['corpus']}`, seed {config['seed']}, {metrics['steps']} steps "
             f"({metrics['train_seconds']:.0f} s), cost vector "
             f"{[round(c, 3) for c in metrics['costs']]}. Objective: **{config['objective']}**"
             + (f"; warm start from `{config['train']['warm_start']}`"
                if config["train"].get("warm_start") else "")
             + (f"; the LM computed in {config['train']['dtype']} under autocast (training "
                f"and this table), the router in float32"
                if config["train"].get("dtype", "float32") != "float32" else "") + ".", "",
             f"| routing | val NLL (nats) | val {bits} | projected FLOP % | expected FLOP % | "
             "routing entropy % |", "|---|---|---|---|---|---|"]
    for mode in ("soft", "hard", "gated"):
        if mode in metrics:
            m = metrics[mode]
            lines.append(f"| {mode} | {_fmt(m['val_nll'])} | {_fmt(m['val_bpc'])} | "
                         f"{_fmt(m['projected_flop_cost'], 1)} | "
                         f"{_fmt(m['expected_flop_cost'], 1)} | {_fmt(m['routing_entropy'], 1)} |")
    lines += ["", f"The table evaluates {metrics['soft']['tokens']} validation tokens. Hard rows "
              "describe the one-hot weights that ran: their expected cost equals the projected "
              "cost and their routing entropy is 0."]
    if evaluations:
        periodic = evaluations[-1]["tokens"]
        if periodic != metrics["soft"]["tokens"]:
            lines[-1] += (f" The periodic validation of the progress bar and training.png "
                          f"uses {periodic} tokens (`--eval-batches`), so its last value can "
                          f"differ from the table's.")
    if "beta0" in metrics:
        lines += ["", "Learned prior concentration beta0 (type-II ML) per layer: "
                  + ", ".join(f"{b:.4g}" for b in metrics["beta0"]) + "."]
    if "elbo" in metrics:
        e = metrics["elbo"]
        lines += ["", f"Held-out objective per token: negative ELBO {e['neg_elbo']:.4f} = NLL "
                  f"{e['nll']:.4f} (one guide sample) + KL {e['kl']:.4f} (per layer "
                  f"{', '.join(f'{v:.4f}' for v in e['kl_per_layer'])})."]
        if "information_per_layer" in e:  # evaluations written before the ELBO surgery lack it
            lines[-1] += (" Per layer the KL splits into the per-token information I(x; alpha) "
                          f"{', '.join(f'{v:.4f}' for v in e['information_per_layer'])} and the "
                          "static allocation's KL(qbar || p) "
                          f"{', '.join(f'{v:.4f}' for v in e['marginal_kl_per_layer'])} "
                          "(ELBO surgery).")
        lines.append("")
    if config.get("gradient_bias"):
        lines += [f"**Warning: biased gradients.** {config['gradient_bias']}.", ""]
    if "oracle" in metrics["soft"]:
        lines += ["", "Per oracle label (soft routing; agreement: the share of a label's targets "
                  "whose argmax routing is the expert it names):", "",
                  *oracle_table(metrics["soft"]["oracle"])]
    share = metrics["soft"]["expert_share"]
    lines += ["", "Expert share per layer (argmax of the posterior mean / softmax weights): "
              + "; ".join(f"layer {i}: " + "/".join(f"{s:.2f}" for s in row)
                          for i, row in enumerate(share)) + ".", ""]
    t = metrics["timing"]
    if t["time_ratio"] is None:
        lines.append(f"Timed hard-routed forward pass: {t['routed_seconds'] * 1e3:.1f} ms (no "
                     "full expert to compare with).")
    else:
        lines.append(f"Timed hard-routed forward pass: {t['routed_seconds'] * 1e3:.1f} ms vs "
                     f"{t['full_only_seconds'] * 1e3:.1f} ms full-only (ratio "
                     f"{t['time_ratio']:.2f}).")
    lines[-1] += decode_sentence(t)
    lines += ["", "![training](training.png)", ""]
    return "\n".join(lines)
