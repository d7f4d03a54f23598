"""Text generation from a run directory (``bayes-router generate``).

See :mod:`bayes_router.inference.decoding` for the decoding itself (the per-expert caches, the
routing at decode time, the sampling); this module makes the prompts (a text, or the start of
validation windows), generates, and writes ``generate.json``, ``routing.png`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure

from bayes_router.analysis.plots import plot_routing_along_text
from bayes_router.analysis.study_plots import save_figure
from bayes_router.core.routing import expert_share
from bayes_router.core.validation import check_int
from bayes_router.data.tokens import TokenData
from bayes_router.experiments.json_files import versions, write_json
from bayes_router.experiments.run_loading import check_run_dir, load_run_dir
from bayes_router.inference.decoding import DecodeConfig, Generation, generate

logger = logging.getLogger(__name__)


def _check(batch: int, prompt_len: int) -> None:
    check_int("batch", batch)
    check_int("prompt_len", prompt_len)


def text_prompt(data: TokenData, prompt: str, batch: int) -> torch.Tensor:
    """The ``(batch, P)`` ids of ``prompt`` repeated ``batch`` times.

    :raises ValueError: for an empty prompt, a run without a character vocabulary (a synthetic
        task), or characters outside the vocabulary (named, as ``repr`` shows them).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("the prompt is empty: give at least one character (or no prompt, to "
                         "start from validation windows)")
    if data.vocab is None:
        raise ValueError(f"a text prompt needs a run trained on a text corpus; this run's data "
                         f"{data.name!r} is a synthetic task, whose tokens are not characters "
                         f"(leave out the prompt to start from its validation sequences)")
    known = set(data.vocab.chars)
    unknown = list(dict.fromkeys(c for c in prompt if c not in known))  # in order of first use
    if unknown:
        raise ValueError("the prompt holds characters outside the run's vocabulary: "
                         + ", ".join(repr(c) for c in unknown))
    return data.vocab.encode(prompt)[None].expand(batch, -1).clone()  # (B, P)


def validation_prompts(data: TokenData, batch: int, prompt_len: int) -> torch.Tensor:
    """The first ``prompt_len`` tokens of the first ``batch`` validation windows ``(B, P)``:
    consecutive windows of ``prompt_len`` tokens of a text corpus, the first ``batch``
    sequences of a synthetic task cut to ``prompt_len``.

    :raises ValueError: if the validation split holds fewer windows, or shorter sequences.
    """
    if not data.synthetic:
        available = (data.splits["val"].numel() - 1) // prompt_len
        if available < batch:
            raise ValueError(f"the validation split holds {available} windows of prompt_len="
                             f"{prompt_len} tokens, fewer than batch={batch}: ask for fewer or "
                             f"shorter prompts")
    x, _ = next(data.eval_batches("val", batch, prompt_len))
    if x.shape[0] < batch:
        raise ValueError(f"the validation split holds {x.shape[0]} sequences, fewer than "
                         f"batch={batch}")
    if x.shape[1] < prompt_len:
        raise ValueError(f"prompt_len={prompt_len} is longer than the validation sequences of "
                         f"{data.name!r} ({x.shape[1]} tokens)")
    return x[:, :prompt_len]


def generate_run(run_dir: Path, out_dir: Path, config: DecodeConfig, prompt: str | None = None,
                 batch: int = 1, prompt_len: int = 16, device: str | torch.device = "cpu"
                 ) -> dict:
    """Generate from the model of a run and write ``generate.json``, ``routing.png`` (the
    routing along sequence 0) and ``report.md`` into ``out_dir``.

    :param config: how to generate (routing, sampling, seed).
    :param prompt: a text, repeated ``batch`` times (the sampling makes the rows differ), for a
        run trained on a text corpus; ``None``: the first ``prompt_len`` tokens of the first
        ``batch`` validation windows.
    :param batch: sequences generated together (>= 1).
    :param prompt_len: tokens of each validation prompt (>= 1; without ``prompt`` only).
    :param device: where the model runs (``"auto"``: CUDA when available).
    :raises ValueError: for bad input, refused before anything is written.
    """
    if not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    _check(batch, prompt_len)
    run_dir = check_run_dir(run_dir)
    out_dir = Path(out_dir)
    with pyro.settings.context(module_local_params=True):
        model, model_cfg, train_cfg, _, data = load_run_dir(run_dir, device)
        prompts = (validation_prompts(data, batch, prompt_len) if prompt is None
                   else text_prompt(data, prompt, batch))
        generation = generate(model, prompts, config, progress=True)
    result = generation_result(generation, data, list(model_cfg.experts), config)
    result = {"run_dir": str(run_dir), "router": train_cfg.router, "router_kind": model.kind,
              "corpus": data.name, "device": str(model.lm.token_embedding.weight.device),
              "prompt_source": "validation" if prompt is None else "text", **result,
              "versions": versions()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_figure(routing_figure(result), out_dir / "routing.png")
    write_json(out_dir / "generate.json", result)
    (out_dir / "report.md").write_text(generate_report(result))
    return result


def generation_result(generation: Generation, data: TokenData, experts: list[str],
                      config: DecodeConfig) -> dict:
    """What :func:`generate_run` records of a :class:`Generation` (the JSON's body): each
    sequence's prompt, new tokens and routing, the timings, the cache and the routing shares."""
    B = generation.tokens.shape[0]
    steps = generation.step_seconds
    mean_step = float(steps.mean()) if steps.numel() else math.nan
    new = generation.new_tokens
    sequences = []
    for b in range(B):
        P = int(generation.prompt_lengths[b])
        end = P + config.max_new_tokens  # every prompt of a run has the same length: no padding
        prompt_ids, new_ids = generation.tokens[b, :P], new[b]
        sequences.append({
            "prompt_ids": prompt_ids.tolist(), "generated_ids": new_ids.tolist(),
            "prompt_text": None if data.vocab is None else data.vocab.decode(prompt_ids),
            "generated_text": None if data.vocab is None else data.vocab.decode(new_ids),
            "experts": generation.experts[:, b, :end].tolist(),
            "uncertainty": generation.uncertainty[:, b, :end].tolist()})
    read = generation.experts[0] > -2  # (B, P + N): every layer reads the same tokens
    codes = generation.experts[:, read]  # (L, N_read): an expert, or -1 soft
    decisions = torch.where(codes < 0, len(experts), codes)  # soft -> class K
    one_hot = torch.nn.functional.one_hot(decisions, len(experts) + 1).numpy()  # (L, N, K+1)
    share = expert_share(one_hot)  # (L, K + 1); every prompt token is read, so N >= 1
    return {"config": dataclasses.asdict(config), "expert_names": experts, "batch": B,
            "prompt_length": int(generation.prompt_lengths.max()),
            "new_tokens": config.max_new_tokens, "sequences": sequences,
            "prefill_seconds": generation.prefill_seconds, "step_seconds": steps.tolist(),
            "mean_step_ms": 1e3 * mean_step, "tokens_per_second": B / mean_step,
            "cache_bytes": generation.cache_bytes,
            "cache_bytes_per_sequence": generation.cache_bytes / B,
            "soft_fraction": generation.soft_fraction(),
            "expert_share": [dict(zip([*experts, "soft"], row.tolist(), strict=True))
                             for row in share]}


def routing_figure(result: dict) -> Figure:
    """The routing of sequence 0 along its text (or its tokens), the prompt marked off."""
    sequence = result["sequences"][0]
    experts = np.asarray(sequence["experts"])  # (L, T)
    uncertainty = np.array(sequence["uncertainty"], dtype=np.float64)  # None -> nan
    text = None
    if sequence["prompt_text"] is not None:
        text = sequence["prompt_text"] + sequence["generated_text"]
    L, T = experts.shape
    fig = Figure(figsize=(float(np.clip(2.5 + 0.09 * T, 6.0, 30.0)), 1.4 + 0.55 * L))
    ax = plot_routing_along_text(experts, uncertainty, expert_names=result["expert_names"],
                                 text=text, ax=fig.add_subplot(), max_characters=400)
    ax.axvline(result["prompt_length"] - 0.5, color="black", linestyle="--", linewidth=1)
    config = result["config"]
    gate = (f" (threshold {config['gate_threshold']:g} on the {config['gate_measure']} "
            f"uncertainty)" if config["routing"] == "gated" else "")
    ax.set_title(f"sequence 0, {config['routing']} routing{gate}", fontsize=9)
    return fig


def _fenced(text: str) -> list[str]:
    """``text`` as a markdown code block whose fence no backtick run inside it closes."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def _number(value, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def generate_report(result: dict) -> str:
    """The generation as markdown: the texts, the speed, the cache and the routing."""
    config = result["config"]
    sampling = ("greedy" if config["temperature"] == 0 else
                f"temperature {config['temperature']:g}"
                + ("" if config["top_k"] is None else f", top-k {config['top_k']}"))
    gate = (f" (threshold {config['gate_threshold']:g} on the {config['gate_measure']} "
            f"uncertainty)" if config["routing"] == "gated" else "")
    source = ("the given text" if result["prompt_source"] == "text" else
              f"the first {result['prompt_length']} tokens of the first {result['batch']} "
              f"validation windows")
    lines = [f"# Generation: {result['router']} run", "",
             f"Run `{result['run_dir']}` (corpus {result['corpus']}), {config['routing']} "
             f"routing{gate}, {sampling}, seed {config['seed']}, on {result['device']}. "
             f"{result['batch']} sequence(s) of {result['new_tokens']} new tokens after "
             f"{source}.", ""]
    for b, sequence in enumerate(result["sequences"]):
        lines += [f"## Sequence {b}", ""]
        if sequence["prompt_text"] is not None:
            lines += ["Prompt:", "", *_fenced(sequence["prompt_text"]), "", "Generated:", "",
                      *_fenced(sequence["generated_text"]), ""]
        else:
            lines += [f"Prompt ids: {sequence['prompt_ids']}", "",
                      f"Generated ids: {sequence['generated_ids']}", ""]
    cache = result["cache_bytes"]
    lines += ["## Speed and cache", "", "| quantity | value |", "|---|---|",
              f"| prefill | {_number(result['prefill_seconds'], '.4f')} s |",
              f"| decoding step (mean of {len(result['step_seconds'])}) | "
              f"{_number(result['mean_step_ms'], '.3f')} ms |",
              f"| tokens per second | {_number(result['tokens_per_second'], '.1f')} |",
              f"| cache after the last step | {cache} bytes "
              f"({result['cache_bytes_per_sequence']:.0f} per sequence) |",
              f"| soft fraction (layer-token decisions) | {result['soft_fraction']:.3f} |", "",
              "The first new token comes from the prefill's logits; each step after it feeds one "
              "token per sequence. Tokens per second: the sequences over the mean step (the "
              "model's pass; the sampling between steps is not timed).", "",
              "## Routing", "",
              "Share of the tokens read (prompts and new tokens, every sequence) that each layer "
              "routed to each expert, or soft (every expert mixed):", "",
              "| layer | " + " | ".join(result["expert_share"][0]) + " |",
              "|---|" + "---|" * len(result["expert_share"][0])]
    for layer, share in enumerate(result["expert_share"]):
        lines.append(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in share.values()) + " |")
    lines += ["", "![routing along sequence 0](routing.png)", "",
              "The figure: the expert each token of sequence 0 read in each layer (grey: soft, "
              "every expert mixed; blank: the last new token, sampled but never read), the "
              "normalised routing uncertainty as a black line across each layer's row (bottom "
              "0, top 1), and the end of the prompt dashed.", ""]
    return "\n".join(lines)
