"""Evaluation of a routed LM: held-out NLL / bits per character and the routing metrics.

Metric names follow the results files (``docs/phase1.md``, "How to read the table"):
``projected_flop_cost``, ``expected_flop_cost`` and ``routing_entropy`` in %, ``expert_share`` per
layer, ``val_nll`` (nats/token), ``val_bpc``.
``abar`` is the posterior mean (Bayesian) or the softmax weights (prior-free) in every mode.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bayes_router.core.categorical import kl_divergence_categorical
from bayes_router.core.clock import median_times
from bayes_router.core.routing import (
    expected_flop_cost,
    expert_share,
    projected_flop_cost,
    routing_entropy,
)
from bayes_router.core.validation import check_int
from bayes_router.data.synthetic import ORACLE_LABEL_IDS, ORACLE_LABELS
from bayes_router.data.tokens import TokenData
from bayes_router.inference.objective import objective_terms
from bayes_router.inference.timing import (
    DECODE_STEPS,
    FULL_ONLY,
    decode_step_times,
    full_only_router,
    reference_expert,
)
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.routed_lm import RoutedLM


@torch.no_grad()
def batch_outputs(model: RoutedLM, x: torch.Tensor, y: torch.Tensor, mode: str = "soft",
                  gate_threshold: float | None = None, gate_measure: str = "total") -> dict:
    """One evaluation pass on a batch, flattened per token: ``logits (N, V)``, ``nll (N,)``,
    ``abar (L, N, K)``, ``applied (L, N, K)`` (the weights the layers applied: ``abar`` under
    soft routing, one-hot under hard routing, either per token under gated),
    ``concentration (L, N, K)`` (Bayesian, else ``None``), ``hard (L, N)`` (hard and gated
    modes, else ``None``), ``tokens (N,)``, ``targets (N,)``."""
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    out = model.predict(x, mode=mode, gate_threshold=gate_threshold, gate_measure=gate_measure)
    logits = out.logits.reshape(-1, out.logits.shape[-1])  # (B T, V)
    targets = y.reshape(-1)
    abar = torch.stack([r.decision.mean.reshape(-1, r.decision.mean.shape[-1])
                        for r in out.routing])
    concentration = (torch.stack([r.decision.concentration.reshape(abar.shape[1:])
                                  for r in out.routing])
                     if out.routing[0].decision.concentration is not None else None)
    hard = (torch.stack([r.hard_mask.reshape(-1) for r in out.routing])
            if out.routing[0].hard_mask is not None else None)
    applied = torch.stack([r.applied_weights.reshape(abar.shape[1:]) for r in out.routing])
    parts = {"logits": logits, "nll": F.cross_entropy(logits, targets, reduction="none"),
             "abar": abar, "applied": applied, "concentration": concentration, "hard": hard,
             "tokens": x.reshape(-1), "targets": targets}
    return {key: None if value is None else value.cpu() for key, value in parts.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (where its inputs must go)."""
    return next(model.parameters()).device


@torch.no_grad()
def collect_batch_outputs(model: RoutedLM, data: TokenData, split: str, seq_len: int,
                          mode: str = "soft", gate_threshold: float | None = None,
                          max_batches: int | None = None, batch_size: int = 16,
                          gate_measure: str = "total", progress: bool = False) -> dict:
    """:func:`batch_outputs` over every evaluation window of a split (at most ``max_batches``
    batches), concatenated along the token axis, with ``oracle (N,)``: the oracle label of
    every target of a synthetic task (``None`` for text)."""
    model.eval()
    parts = []
    total = -(-data.num_windows(split, seq_len) // batch_size)
    batches = data.eval_batches_with_oracle(split, batch_size, seq_len, max_batches=max_batches)
    for x, y, oracle in tqdm(batches, total=total if max_batches is None else
                             min(total, max_batches), disable=not progress,
                             desc=f"evaluate ({mode}, {split})", dynamic_ncols=True):
        part = batch_outputs(model, x, y, mode, gate_threshold, gate_measure)
        part["oracle"] = None if oracle is None else oracle.reshape(-1)
        parts.append(part)
    if not parts:
        raise ValueError(f"split {split!r} is too short for one window of {seq_len} tokens")
    token_dim = {"abar": 1, "applied": 1, "concentration": 1, "hard": 1}
    return {key: None if parts[0][key] is None else
            torch.cat([p[key] for p in parts], dim=token_dim.get(key, 0))
            for key in parts[0]}


def routing_metrics(abar: torch.Tensor, costs: torch.Tensor,
                    applied: torch.Tensor | None = None) -> dict:
    """The routing metrics (:mod:`bayes_router.core.routing`) from ``abar (L, N, K)`` and the
    cost vector: the projected cost and expert shares from ``abar``'s argmax, the expected cost
    and routing entropy from the weights the layers ``applied`` (``abar`` if not given), so that
    under hard routing they describe the one-hot weights that actually ran."""
    abar_np, costs_np = abar.double().numpy(), costs.double().numpy()
    applied_np = abar_np if applied is None else applied.double().numpy()
    share = expert_share(abar_np)
    return {
        "projected_flop_cost": float(projected_flop_cost(abar_np, costs_np)),
        "expected_flop_cost": float(expected_flop_cost(applied_np, costs_np)),
        # a single expert leaves nothing to choose: fully committed routing
        "routing_entropy": (float(routing_entropy(applied_np)) if abar_np.shape[-1] > 1
                            else 0.0),
        "expert_share": np.asarray(share).tolist(),
        "expert_share_mean": np.asarray(share).mean(0).tolist(),
    }


def evaluate(model: RoutedLM, data: TokenData, split: str, seq_len: int, mode: str = "soft",
             gate_threshold: float | None = None, max_batches: int | None = None,
             batch_size: int = 16, progress: bool = False, gate_measure: str = "total"
             ) -> dict:
    """``{split}_nll``, ``{split}_bpc`` and the routing metrics under routing ``mode`` (gated
    routing reads ``gate_measure``, see :meth:`~bayes_router.models.routed_lm.RoutedLM.
    predict`).

    ``{split}_bpc`` is the NLL in bits per token; ``bits_unit`` says what a token is
    (``"character"`` for a text corpus, so bits per character; ``"token"`` for a synthetic
    task, whose reports say bits per token)."""
    arrays = collect_batch_outputs(model, data, split, seq_len, mode, gate_threshold,
                                   max_batches, batch_size, gate_measure=gate_measure,
                                   progress=progress)
    mean_nll = float(arrays["nll"].mean())
    metrics = {f"{split}_nll": mean_nll, f"{split}_bpc": mean_nll / math.log(2),
               "bits_unit": bits_unit(data), "mode": mode,
               "tokens": int(arrays["nll"].numel())}
    metrics.update(routing_metrics(arrays["abar"], model.costs, arrays["applied"]))
    if arrays["hard"] is not None:
        metrics["hard_fraction"] = float(arrays["hard"].float().mean())
    if arrays["oracle"] is not None:
        metrics["oracle"] = oracle_metrics(arrays, model.cfg.experts)
    return metrics


def bits_unit(data: TokenData) -> str:
    """What one token of ``data`` is: ``"character"`` (text) or ``"token"`` (synthetic)."""
    return "token" if data.synthetic else "character"


def bits_label(metrics: dict) -> str:
    """``"bits/char"`` or ``"bits/token"`` for metrics from :func:`evaluate`."""
    return "bits/token" if metrics.get("bits_unit") == "token" else "bits/char"


@torch.no_grad()
def heldout_objective(model: RoutedLM, data: TokenData, split: str, seq_len: int,
                      max_batches: int | None = None, batch_size: int = 16, seed: int = 0
                      ) -> dict:
    """The negative ELBO per token on ``split`` and its parts, averaged over tokens:
    ``neg_elbo = nll + kl`` with ``nll`` under one guide sample path per batch (seeded with
    ``seed + j``, the RNG of the caller untouched) and ``kl`` the analytic KL summed over layers
    (:func:`~bayes_router.inference.objective.objective_terms`), and each layer's KL split
    into ``information_per_layer`` and ``marginal_kl_per_layer`` (ELBO surgery within each
    batch of ``batch_size`` windows, whose guide posteriors' mixture stands for the aggregate
    posterior). For a router without latents it is the log-likelihood (``kl = 0``)."""
    model.eval()
    totals, tokens = None, 0
    with torch.random.fork_rng(devices=[]):
        for j, (x, y) in enumerate(data.eval_batches(split, batch_size, seq_len,
                                                     max_batches=max_batches)):
            torch.manual_seed(seed + j)
            device = model_device(model)
            terms = objective_terms(model, x.to(device), y.to(device))
            part = np.array([[terms["nll"]] * len(terms["kl_per_layer"]),
                             terms["kl_per_layer"], terms["information_per_layer"]]) * x.numel()
            totals = part if totals is None else totals + part
            tokens += x.numel()
    if totals is None:
        raise ValueError(f"split {split!r} is too short for one window of {seq_len} tokens")
    nll, kl, information = totals / tokens  # each (n_layers,); nll repeated per layer
    return {"neg_elbo": float(nll[0] + kl.sum()), "nll": float(nll[0]), "kl": float(kl.sum()),
            "kl_per_layer": kl.tolist(), "information_per_layer": information.tolist(),
            "marginal_kl_per_layer": (kl - information).tolist(), "tokens": tokens,
            "seed": seed}


def oracle_metrics(arrays: dict, experts: tuple[str, ...]) -> dict:
    """Per oracle label of a synthetic task (:data:`~bayes_router.data.synthetic.ORACLE_LABELS`
    and ``"any"``): the share of targets, their NLL and argmax accuracy, and per layer the
    routing's agreement with the oracle (the share of the label's targets whose argmax routing
    is the expert the label names; ``None`` if the LM lacks that expert).

    :param arrays: :func:`collect_batch_outputs`'s output with its ``oracle`` labels.
    """
    oracle, nll = arrays["oracle"], arrays["nll"]
    correct = arrays["logits"].argmax(-1) == arrays["targets"]
    choice = arrays["abar"].argmax(-1)  # (L, N)
    result = {}
    for name, label in ORACLE_LABEL_IDS.items():
        mask = oracle == label
        count = int(mask.sum())
        if count == 0:
            continue
        entry = {"share": count / oracle.numel(), "tokens": count,
                 "nll": float(nll[mask].mean()), "accuracy": float(correct[mask].float().mean())}
        if name in ORACLE_LABELS:
            entry["agreement"] = ([float((choice[:, mask] == experts.index(name)).float()
                                         .mean(1)[layer]) for layer in range(choice.shape[0])]
                                  if name in experts else None)
        result[name] = entry
    return result


@torch.no_grad()
def timed_forward(model: RoutedLM, x: torch.Tensor, mode: str = "hard", repeats: int = 5,
                  gate_threshold: float | None = None) -> dict:
    """Median seconds of the routed forward pass in ``mode`` beside the full-only forward pass
    (every token on ``full``, computed by the same sparse code path), measured interleaved.
    An LM without a ``full`` expert is timed alone (``time_ratio`` ``None``)."""
    model.eval()
    x = x.to(model_device(model))
    synchronise = (torch.cuda.synchronize if x.device.type == "cuda"
                   else (lambda: None))  # time the device's work, not its queueing

    def routed():
        model.predict(x, mode=mode, gate_threshold=gate_threshold)
        synchronise()

    if "full" not in model.cfg.experts:
        routed_s = median_times({"routed": routed}, repeats, warmup=1)["routed"]
        return {"routed_seconds": routed_s, "full_only_seconds": None, "time_ratio": None,
                "repeats": repeats, "mode": mode}
    full_only = full_only_router(model)

    def reference():
        model.lm(x, full_only, mode="hard")
        synchronise()

    times = median_times({"routed": routed, "full_only": reference}, repeats, warmup=1)
    routed_s, full_s = times["routed"], times["full_only"]
    return {"routed_seconds": routed_s, "full_only_seconds": full_s,
            "time_ratio": routed_s / full_s, "repeats": repeats, "mode": mode}


def timed_decode(model: RoutedLM, x: torch.Tensor, mode: str = "hard",
                 gate_threshold: float | None = None, context: int | None = None,
                 steps: int = DECODE_STEPS, repeats: int = 5, gate_measure: str = "total"
                 ) -> dict:
    """Median milliseconds of one decoding step in ``mode`` beside the full-only decoding step,
    each from a cache of ``context`` tokens of ``x`` (see
    :func:`~bayes_router.inference.timing.decode_step_times`).

    Where :func:`timed_forward` times the whole sequence (a prefill), this times what generation
    repeats per token: at a long context a query routed away from ``full`` reads a state whose
    size does not grow with the context.

    :param x: ``(B, T)`` token ids, ``T >= context + steps``.
    :param context: default the longest that ``x`` and the model allow:
        ``min(T, max_seq_len) - steps``.
    :returns: ``decode_step_ms``, ``decode_full_only_step_ms``, ``decode_time_ratio`` (their
        ratio), ``decode_context``, ``decode_steps``, ``decode_batch`` and ``decode_reference``
        (the reference's expert: ``full``, else the most expensive, see
        :func:`~bayes_router.inference.timing.reference_expert`).
    """
    if context is None:
        context = min(x.shape[-1], model.cfg.max_seq_len) - steps
        if context < 1:
            raise ValueError(f"x holds {x.shape[-1]} tokens per sequence: too few for a context "
                             f"of at least 1 token and {steps} decoding steps")
    times = decode_step_times(model, x, {"routed": (mode, gate_threshold)}, context, steps,
                              repeats, warmup=1, gate_measure=gate_measure)
    routed_ms = 1e3 * statistics.median(times["routed"])
    full_ms = 1e3 * statistics.median(times[FULL_ONLY])
    return {"decode_step_ms": routed_ms, "decode_full_only_step_ms": full_ms,
            "decode_time_ratio": routed_ms / full_ms, "decode_context": context,
            "decode_steps": steps, "decode_batch": int(x.shape[0]),
            "decode_reference": model.cfg.experts[reference_expert(model)]}


# ------------------------------------------------------------------------------------------------
# every predictive of the analysis, per token


@dataclass
class TokenArrays:
    """Per-token values of one pass over a split: ``N = W T`` tokens of ``W`` windows of ``T``.

    :ivar probs: plug-in predictive probabilities (soft routing) ``(N, V)``, float32.
    :ivar nll: plug-in per-token NLL ``(N,)`` (cross-entropy of the soft logits).
    :ivar bma_probs: Bayesian model average over routing samples ``(N, V)`` (Bayesian only).
    :ivar damage: ``KL(soft || hard)`` per token ``(N,)`` (when the hard pass ran).
    :ivar hard_nll: per-token NLL under hard routing ``(N,)`` (when the hard pass ran).
    :ivar abar: posterior-mean (or softmax) routing weights ``(L, N, K)``.
    :ivar concentration: the guide's Dirichlet concentration ``(L, N, K)`` (Bayesian only).
    :ivar oracle: oracle expert per token, ``-1`` for "any" ``(N,)`` (synthetic tasks only).
    """

    window_len: int
    tokens: np.ndarray
    targets: np.ndarray
    probs: np.ndarray
    nll: np.ndarray
    abar: np.ndarray
    bma_probs: np.ndarray | None = None
    damage: np.ndarray | None = None
    hard_nll: np.ndarray | None = None
    concentration: np.ndarray | None = None
    oracle: np.ndarray | None = None

    @property
    def n_windows(self) -> int:
        return len(self.tokens) // self.window_len


@torch.no_grad()
def collect_token_arrays(model, data, split: str, seq_len: int, max_batches: int | None = None,
                         batch_size: int = 16, num_samples: int = 8, hard: bool = True,
                         seed: int = 0, progress: bool = False) -> TokenArrays:
    """Run the soft, hard and (Bayesian) sampled predictives over the windows of ``split``.

    The windows are those of :func:`~bayes_router.inference.evaluate.collect_batch_outputs`
    with the same ``batch_size`` and ``max_batches``.

    :param num_samples: routing samples of the Bayesian model average.
    :param hard: also run hard routing (for the damage).
    :param seed: seed of the routing samples (the global torch generator is restored after).
    """
    check_int("num_samples", num_samples)
    model.eval()
    bayesian = isinstance(model, BayesianRoutedLM)
    total = -(-data.num_windows(split, seq_len) // batch_size)
    total = total if max_batches is None else min(total, max_batches)
    parts: dict[str, list] = {name: [] for name in (
        "tokens", "targets", "probs", "nll", "abar", "bma", "damage", "hard_nll",
        "concentration", "oracle")}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batches = data.eval_batches_with_oracle(split, batch_size, seq_len, max_batches)
        for x, y, oracle in tqdm(batches, total=total, disable=not progress, desc="analysis",
                                 dynamic_ncols=True):
            soft = batch_outputs(model, x, y, mode="soft")
            logits, targets = soft["logits"], soft["targets"]  # (B T, V), (B T,)
            for name in ("tokens", "targets", "nll", "abar"):
                parts[name].append(soft[name])
            parts["probs"].append(logits.softmax(-1))
            if soft["concentration"] is not None:
                parts["concentration"].append(soft["concentration"])
            x = x.to(model_device(model))
            if hard:
                hard_logits = model.predict(x, mode="hard").logits.cpu()
                hard_logits = hard_logits.reshape(-1, hard_logits.shape[-1])
                parts["damage"].append(kl_divergence_categorical(logits.double(),
                                                                 hard_logits.double()))
                parts["hard_nll"].append(torch.nn.functional.cross_entropy(
                    hard_logits, targets, reduction="none"))
            if bayesian:
                bma = model.sample_predict(x, num_samples).cpu()
                parts["bma"].append(bma.reshape(-1, bma.shape[-1]))
            if oracle is not None:
                parts["oracle"].append(oracle.reshape(-1))
    if not parts["tokens"]:
        raise ValueError(f"split {split!r} is too short for one window of {seq_len} tokens")

    def cat(name: str, dim: int = 0):
        return torch.cat(parts[name], dim=dim).numpy() if parts[name] else None

    return TokenArrays(window_len=seq_len, tokens=cat("tokens"), targets=cat("targets"),
                       probs=cat("probs"), nll=cat("nll"), abar=cat("abar", 1),
                       bma_probs=cat("bma"), damage=cat("damage"), hard_nll=cat("hard_nll"),
                       concentration=cat("concentration", 1), oracle=cat("oracle"))


# ------------------------------------------------------------------------------------------------
# the numbers
