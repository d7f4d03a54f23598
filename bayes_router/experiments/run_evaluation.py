"""Evaluating a trained run: the held-out metrics and timings of ``metrics.json``, and
:func:`evaluate_run`, which evaluates a run directory under one routing mode and split into
``metrics_<tag>.json`` (with its report and figure, see
:func:`~bayes_router.experiments.run_report.write_evaluation_report`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyro
import torch

from bayes_router.core.precision import dtype_name, resolve_dtype
from bayes_router.data.tokens import TokenData
from bayes_router.experiments.json_files import write_json
from bayes_router.experiments.run_loading import check_run_dir, load_run_dir
from bayes_router.experiments.run_report import write_evaluation_report
from bayes_router.inference.evaluate import (
    evaluate,
    heldout_objective,
    timed_decode,
    timed_forward,
)
from bayes_router.inference.timing import DECODE_STEPS
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.routed_lm import RoutedLM

logger = logging.getLogger(__name__)

#: Validation batches (of 16 windows) behind metrics.json and the analysis report alike.
EVAL_BATCHES = 32


def decode_timing(model: RoutedLM, data: TokenData, split: str, seq_len: int, mode: str,
                  gate_threshold: float | None = None, repeats: int = 5,
                  gate_measure: str = "total", length: int | None = None) -> dict:
    """:func:`~bayes_router.inference.evaluate.timed_decode` on the first 8 windows of
    ``split`` of ``length`` tokens (default: as long as the model reads, ``max_seq_len``, or
    windows of ``seq_len`` where the split is too short for one), at the longest context they
    leave for :data:`~bayes_router.inference.timing.DECODE_STEPS` steps after it (fewer steps
    in windows shorter than that); ``{}`` for windows of a single token."""
    if length is not None:
        x, _ = next(data.eval_batches(split, 8, length))
    else:
        try:
            x, _ = next(data.eval_batches(split, 8, model.cfg.max_seq_len))
        except ValueError:  # the split holds no window that long
            x, _ = next(data.eval_batches(split, 8, seq_len))
    length = x.shape[1] if model.cfg.max_context is None else min(x.shape[1],
                                                                   model.cfg.max_context)
    if length < 2:
        logger.warning("no decoding timing: the %s windows hold %d token(s)", split, length)
        return {}
    steps = min(DECODE_STEPS, length - 1)
    return timed_decode(model, x, mode=mode, gate_threshold=gate_threshold,
                        context=length - steps, steps=steps, repeats=repeats,
                        gate_measure=gate_measure)


def held_out_metrics(model, data: TokenData, train_cfg: TrainConfig, eval_batches: int | None,
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


def evaluate_run(run_dir: Path, mode: str = "soft", gate_threshold: float | None = None,
                 split: str = "val", max_batches: int | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 seq_len: int | None = None) -> dict:
    """Evaluate a trained run under a routing ``mode`` on ``split``, computing in ``dtype``, on
    windows of ``seq_len`` tokens (default: the run's training length; longer than
    ``max_seq_len`` only with rotary positions), and time its decoding step at the longest
    context those windows leave; writes ``metrics_<tag>.json``, ``evaluation_<tag>.md`` and
    ``expert_share_<tag>.png`` with the tag ``<split>_<mode>`` (``<split>_gated_<threshold>``
    for gated routing, ``_T<seq_len>`` appended for another window length, ``_<dtype>`` below
    float32), so evaluations of different splits, modes, thresholds, lengths or precisions
    never overwrite each other.

    :raises ValueError: for a ``seq_len`` below 2, past ``max_seq_len`` with learned
        positions, or longer than the split.
    """
    run_dir = check_run_dir(run_dir)
    dtype = dtype_name(resolve_dtype(dtype))  # "bfloat16" for torch.bfloat16 too
    with pyro.settings.context(module_local_params=True):
        model, model_cfg, train_cfg, _, data = load_run_dir(run_dir, device, dtype)
        length = train_cfg.seq_len if seq_len is None else check_eval_length(seq_len, model, data,
                                                                           split)
        metrics = evaluate(model, data, split, length, mode=mode,
                           gate_threshold=gate_threshold, max_batches=max_batches,
                           progress=True)
        if mode == "soft":
            metrics["elbo"] = heldout_objective(model, data, split, length,
                                                max_batches=max_batches)
        x, _ = next(data.eval_batches(split, 8, length))
        metrics["timing"] = timed_forward(model, x, mode=mode, gate_threshold=gate_threshold)
        metrics["timing"].update(decode_timing(model, data, split, length, mode,
                                               gate_threshold,
                                               length=None if length == train_cfg.seq_len
                                               else length))
    metrics["dtype"] = dtype
    metrics["seq_len"] = length
    tag = (evaluation_tag(split, mode, gate_threshold)
           + ("" if length == train_cfg.seq_len else f"_T{length}")
           + ("" if dtype == "float32" else f"_{dtype}"))
    write_json(run_dir / f"metrics_{tag}.json", metrics)
    write_evaluation_report(run_dir, metrics, mode, split, model.cfg.experts, tag)
    return metrics


def check_eval_length(seq_len, model: RoutedLM, data: TokenData, split: str) -> int:
    """``seq_len`` if the model reads windows that long and the text split ``split`` holds
    one, else a ``ValueError`` that says which limit it passes."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    limit = model.cfg.max_context
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is past the model's max_seq_len={limit}: learned "
                         f"positions read at most that many tokens (a model trained with "
                         f"--positions rotary reads further)")
    if data.synthetic:
        raise ValueError(f"seq_len applies to a text corpus; {data.name} is a synthetic task, "
                         f"whose sequences have their own length")
    available = data.split_length(split)
    if seq_len + 1 > available:
        raise ValueError(f"seq_len {seq_len} is longer than the {split} split allows "
                         f"({available} tokens: windows of at most {available - 1})")
    return seq_len


def evaluation_tag(split: str, mode: str, gate_threshold: float | None = None) -> str:
    """``val_soft``, ``test_hard``, ``val_gated_0.5``: the suffix of an evaluation's files."""
    return f"{split}_{mode}" + (f"_{gate_threshold:g}" if mode == "gated" else "")
