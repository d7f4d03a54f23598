"""Empirical Bayes for ``beta0`` on a trained run: type-II maximum likelihood inside SVI beside
Minka's M-step on the guide's expected sufficient statistics, scored on held-out batches and
written as ``beta0.json``, a figure and ``report.md`` (``bayes-router fit-beta0``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure
from torch import Tensor

from bayes_router.analysis.study_plots import plot_beta0_objective, plot_beta0_trace, save_figure
from bayes_router.core.dirichlet import dirichlet_kl_to_prior
from bayes_router.core.options import option
from bayes_router.core.validation import check_int
from bayes_router.experiments.json_files import versions, write_json
from bayes_router.experiments.run_loading import check_run_dir, load_run_dir
from bayes_router.inference.empirical_bayes import (
    METHODS,
    SETTLED_LOG_DRIFT,
    fit_beta0_minka,
    fit_beta0_svi,
    guide_concentrations,
    prior_mean,
)
from bayes_router.models.bayesian import BayesianRoutedLM

logger = logging.getLogger(__name__)


def _sample_batches(data, split: str, count: int, batch_size: int, seq_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [data.sample_batch(split, batch_size, seq_len, generator) for _ in range(count)]


def _heldout(concentrations: list[Tensor], log_likelihood: float, tokens: int, beta0,
             pi: Tensor) -> dict:
    """Per-token held-out ELBO with ``beta0`` (per layer) plugged into the prior."""
    kl = [float(dirichlet_kl_to_prior(c, b, pi).sum()) / tokens
          for c, b in zip(concentrations, beta0, strict=True)]
    return {"elbo": log_likelihood / tokens - sum(kl), "kl": kl,
            "log_likelihood": log_likelihood / tokens}


ESTIMATES = ("run", "svi", "minka", "minka_after_svi", "heldout_optimum")
_DEFAULT_GRID = tuple(10.0 ** (i / 10) for i in range(-20, 21))  # 0.01 .. 100



def _check_rate(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Beta0FitConfig:
    """How :func:`fit_beta0_run` fits ``beta0``.

    :param method: ``"svi"`` (type-II ML by SVI on ``log beta0``), ``"minka"`` (the
        fixed-point M-step on the guide's expected statistics) or ``"both"``.
    :param svi_steps: SVI steps continuing a fixed-``beta0`` run with ``beta0`` learned (and
        as many for the control continued with it fixed).
    :param beta0_lr: learning rate of ``log beta0`` in those steps.
    :param lr: learning rate of the guide and the LM in those steps; ``None``: the run's.
    :param stat_batches: random training batches behind the guide's expected statistics
        (Minka).
    :param eval_batches: validation batches of the held-out ELBO.
    :param update_pi: with Minka, also report a full fit of the prior mean ``pi`` and the
        precision beside the fit of ``beta0`` under the run's ``pi``.
    :param grid: ``beta0`` values at which the held-out ``-KL`` is tabulated and drawn.
    :param seed: seed of the batches and of the guide's samples.
    """

    method: str = option(
        "both", "svi: type-II ML by SVI on log beta0; minka: the fixed-point M-step on the "
        "guide's expected statistics; both", choices=METHODS)
    svi_steps: int = option(200, "SVI steps continuing a fixed-beta0 run with beta0 learned")
    beta0_lr: float = option(0.05, "learning rate of log beta0 in those steps")
    lr: float | None = option(
        None, "learning rate of the guide and the LM in those steps (default: the run's)")
    stat_batches: int = option(
        16, "training batches of the guide's expected statistics (Minka)")
    eval_batches: int = option(8, "validation batches of the held-out ELBO")
    update_pi: bool = option(
        False, "also fit the prior mean pi (Minka, full Dirichlet)", switch=True)
    grid: tuple[float, ...] = option(
        _DEFAULT_GRID, "comma-separated beta0 values of the held-out -KL curve (default: 41 "
        "values from 0.01 to 100, log-spaced)")
    seed: int = option(0, "seed of the batches and guide samples")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_int("svi_steps", self.svi_steps)
        _check_rate("beta0_lr", self.beta0_lr)
        if self.lr is not None:
            _check_rate("lr", self.lr)
        check_int("stat_batches", self.stat_batches)
        check_int("eval_batches", self.eval_batches)
        if not isinstance(self.update_pi, bool):
            raise TypeError(f"update_pi must be a bool, got {self.update_pi!r}")
        if isinstance(self.grid, str | bytes) or not hasattr(self.grid, "__iter__"):
            raise TypeError(f"grid must be a list or tuple, got {self.grid!r}")
        object.__setattr__(self, "grid", tuple(self.grid))
        if not self.grid or not all(isinstance(v, Real) and not isinstance(v, bool)
                                    and math.isfinite(v) and v > 0 for v in self.grid):
            raise ValueError("grid must hold positive beta0 values")
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def fit_beta0_run(run_dir, config: Beta0FitConfig, out_dir=None, *,
                  progress: bool = True) -> dict:
    """Empirical-Bayes ``beta0`` of a trained Bayesian run, by type-II ML in SVI and/or Minka
    (``config.method``).

    - ``minka``: Minka's M-step per layer (:func:`fit_beta0_minka`) on the trained guide's
      ``E_q[log alpha]`` averaged over the tokens of ``config.stat_batches`` random training
      batches, with the run's cost-based ``pi`` (with ``config.update_pi``, a full fit of mean
      and precision is reported beside it).
    - ``svi``: if the run learned ``beta0`` (``--beta0 learn``), its value is read; otherwise
      the run is continued for ``config.svi_steps`` steps with ``beta0`` learned from the run's
      value (:func:`fit_beta0_svi`, jointly with the guide and the LM). With ``both``, Minka is
      also applied to the continued guide (``minka_after_svi``): at a joint fixed point the two
      coincide, so that is the cross-check. The SVI estimate is the geometric mean of
      ``beta0`` over the last quarter of the steps if it has settled there (``log beta0`` moved
      by less than 0.05), else the final iterate (flagged ``settled: false``). A control run
      continued for as many steps with ``beta0`` fixed is scored beside the continued model
      (``fixed_continued_model``).

    Every estimate is scored by the per-token ELBO on ``config.eval_batches`` validation
    batches with the run's guide and that ``beta0`` plugged into the prior (the guide is fixed,
    so only the KL term moves; the likelihood term is the same sample for every estimate). The
    held-out optimum per layer (``heldout_optimum``) is Minka's fit on the validation
    statistics, and the held-out ``-KL`` is also tabulated on ``config.grid``.

    Writes into ``out_dir`` (default ``run_dir/empirical-bayes``): ``beta0.json``, whose only
    keys naming ``beta0`` hold estimates (the top-level ``"beta0"``, one value per layer: the
    Minka estimate, the SVI one, or with ``both`` their geometric mean; and per layer
    ``beta0_svi`` / ``beta0_minka``), so that ``sweep-beta0 --mark beta0.json`` reads their
    mean; ``report.md``; and ``beta0.png``.

    :returns: the content of ``beta0.json``.
    """
    method, seed = config.method, config.seed
    svi_steps, beta0_lr = config.svi_steps, config.beta0_lr
    run_dir = check_run_dir(Path(run_dir))
    out_dir = run_dir / "empirical-bayes" if out_dir is None else Path(out_dir)
    model, model_cfg, train_cfg, payload, data = load_run_dir(run_dir)
    if not isinstance(model, BayesianRoutedLM):
        raise ValueError(f"{run_dir} holds a {train_cfg.router} run; empirical Bayes for beta0 "
                         "needs a Bayesian run")
    if model.prior != "power" or model.learn_prior_mean:
        raise ValueError(f"{run_dir} was trained with prior {train_cfg.prior!r} and prior mean "
                         f"{train_cfg.prior_mean!r}; fit-beta0 fits beta0 under the power prior "
                         "with its cost-based mean held fixed (a learned mean was already "
                         "fitted by type-II ML in training; --update-pi fits one here)")
    out_dir.mkdir(parents=True, exist_ok=True)
    pi = prior_mean(model)
    with pyro.settings.context(module_local_params=True):
        run_beta0 = model.current_beta0().detach().tolist()
    train_batches = _sample_batches(data, "train", config.stat_batches, train_cfg.batch_size,
                                    train_cfg.seq_len, seed)
    val_batches = list(data.eval_batches("val", train_cfg.batch_size, train_cfg.seq_len,
                                         max_batches=config.eval_batches))
    if not val_batches:
        raise ValueError(f"the validation split of {run_dir} is too short for one window")
    train_conc, _, train_tokens = guide_concentrations(model, train_batches, seed)
    val_conc, val_loglik, val_tokens = guide_concentrations(model, val_batches, seed)
    result: dict = {"run_dir": str(run_dir), "method": method, "run_step": int(payload["step"]),
                    "run_learned": bool(model.learn_beta0), "run_prior": run_beta0,
                    "pi": pi.tolist(), "statistic_tokens": train_tokens,
                    "heldout_tokens": val_tokens, "estimates": {}, "versions": versions()}
    estimates = result["estimates"]  # name -> {"values": per layer, ...}; no key names beta0
    estimates["run"] = {"values": run_beta0}
    if method in ("minka", "both"):
        minka = fit_beta0_minka(train_conc, pi, update_pi=config.update_pi)
        estimates["minka"] = {"values": minka.pop("beta0"), **minka}
    continued = None
    if method in ("svi", "both"):
        if model.learn_beta0:
            estimates["svi"] = {"values": run_beta0, "source": "learned during training"}
        else:
            fit = fit_beta0_svi(model, data, train_cfg, svi_steps, beta0_lr=beta0_lr,
                                lr=config.lr, seed=seed, progress=progress)
            continued = fit.pop("model")
            settled = fit["tail_log_drift"] < SETTLED_LOG_DRIFT
            estimates["svi"] = {"values": fit["beta0"] if settled else fit["last"],
                                "trace": fit["trace"], "tail_mean": fit["beta0"],
                                "last_iterate": fit["last"],
                                "tail_log_drift": fit["tail_log_drift"], "settled": settled,
                                "steps": svi_steps, "learning_rate": beta0_lr,
                                "source": f"run continued for {svi_steps} SVI steps with "
                                          f"beta0 learned (learning rate {beta0_lr})"}
        if method == "both" and continued is not None:
            conc, _, _ = guide_concentrations(continued, train_batches, seed)
            estimates["minka_after_svi"] = {"values": fit_beta0_minka(conc, pi)["beta0"]}
    estimates["heldout_optimum"] = {"values": fit_beta0_minka(val_conc, pi)["beta0"]}
    result["elbo"] = {name: _heldout(val_conc, val_loglik, val_tokens, e["values"], pi)
                      for name, e in estimates.items()}
    if continued is not None:
        control = fit_beta0_svi(model, data, train_cfg, svi_steps, beta0_lr=beta0_lr,
                                lr=config.lr, learn_beta0=False, seed=seed,
                                progress=progress)["model"]
        for name, other in (("svi_continued_model", continued),
                            ("fixed_continued_model", control)):
            conc, loglik, tokens = guide_concentrations(other, val_batches, seed)
            with pyro.settings.context(module_local_params=True):
                own = other.beta0.detach().tolist()
            result["elbo"][name] = _heldout(conc, loglik, tokens, own, pi)
    result["grid"] = {"values": list(config.grid), "kl": [
        [float(dirichlet_kl_to_prior(c, b, pi).mean()) for b in config.grid]
        for c in val_conc]}
    chosen = [name for name in ("svi", "minka") if name in estimates]
    per_layer = torch.tensor([estimates[name]["values"] for name in chosen],
                             dtype=torch.float64)
    result["beta0"] = per_layer.log().mean(0).exp().tolist()
    result["layers"] = [{"layer": layer, **{f"beta0_{name}": estimates[name]["values"][layer]
                                            for name in chosen}}
                        for layer in range(len(run_beta0))]
    write_json(out_dir / "beta0.json", result)  # strict JSON: NaN becomes null
    plot_beta0_fit(result, out_dir / "beta0.png")
    (out_dir / "report.md").write_text(beta0_report(result))
    logger.info("fit_beta0_run: %s", result["layers"])
    return result


_ESTIMATE_STYLE = {"run": ("grey", "-"), "svi": ("tab:blue", "--"),
                   "minka": ("tab:orange", ":"), "minka_after_svi": ("tab:green", "-."),
                   "heldout_optimum": ("black", (0, (1, 3)))}


def plot_beta0_fit(result: dict, path) -> None:
    """Per layer, the held-out ``-KL`` per token against ``beta0`` (the part of the held-out
    ELBO that ``beta0`` moves, guide fixed) with every estimate marked; and the SVI trace."""
    layers = len(result["run_prior"])
    trace = result["estimates"].get("svi", {}).get("trace")
    ncols = layers + (1 if trace else 0)
    fig = Figure(figsize=(4.0 * ncols, 3.3))
    axes = list(np.atleast_1d(fig.subplots(1, ncols)))
    for layer in range(layers):
        estimates = {name: result["estimates"][name]["values"][layer] for name in _ESTIMATE_STYLE
                     if name in result["estimates"]}
        marked = [result["elbo"][name]["kl"][layer] for name in _ESTIMATE_STYLE
                  if name in result["elbo"]]
        plot_beta0_objective(result["grid"]["values"], result["grid"]["kl"][layer], estimates,
                             ax=axes[layer], marked_kl=marked, styles=_ESTIMATE_STYLE,
                             title=f"layer {layer}")
    if trace:
        plot_beta0_trace(trace, ax=axes[-1])
    save_figure(fig, path)


def beta0_report(result: dict) -> str:
    """The markdown report of :func:`fit_beta0_run`."""
    layers = len(result["run_prior"])
    lines = ["# Empirical Bayes for beta0", "",
             f"Run `{result['run_dir']}` (step {result['run_step']}; beta0 "
             f"{'learned' if result['run_learned'] else 'fixed'} at "
             f"{[round(v, 4) for v in result['run_prior']]}), prior mean pi = "
             f"{[round(v, 4) for v in result['pi']]}. Minka statistics from "
             f"{result['statistic_tokens']} training tokens; held-out ELBO on "
             f"{result['heldout_tokens']} validation tokens with the run's guide.", ""]
    if "svi" in result["estimates"]:
        svi = result["estimates"]["svi"]
        lines += [f"SVI: {svi['source']}.", ""]
        if "trace" in svi:
            state = ("settled: the estimate is the geometric mean over that tail" if
                     svi["settled"] else "**still drifting**: the estimate is the final iterate; "
                     "it is not converged, read it as a direction, not a value")
            lines += [f"Over the last 25 % of the steps log beta0 moved by up to "
                      f"{svi['tail_log_drift']:.3f} ({state}). Tail mean "
                      f"{[round(v, 4) for v in svi['tail_mean']]}, final iterate "
                      f"{[round(v, 4) for v in svi['last_iterate']]}.", ""]
    lines += ["| estimate | " + " | ".join(f"beta0 layer {i}" for i in range(layers))
              + " | held-out ELBO / token | KL / token |",
              "|---|" + "---|" * layers + "---|---|"]
    for name in ESTIMATES:
        if name not in result["estimates"]:
            continue
        values = result["estimates"][name]["values"]
        e = result["elbo"][name]
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values)
                     + f" | {e['elbo']:.5f} | {sum(e['kl']):.5f} |")
    if "svi_continued_model" in result["elbo"]:
        e = result["elbo"]["svi_continued_model"]
        c = result["elbo"]["fixed_continued_model"]
        lines += ["", f"The SVI-continued model (its own guide, LM and learned beta0) scores "
                      f"{e['elbo']:.5f} nats/token on the same held-out batches (KL "
                      f"{sum(e['kl']):.5f}); the control, continued for as many steps with beta0 "
                      f"fixed at the run's value, scores {c['elbo']:.5f} (KL {sum(c['kl']):.5f})."]
    lines += ["", "`heldout_optimum` maximises the held-out ELBO with the guide fixed "
                  "(Minka on the validation statistics).", "",
              f"Top-level `beta0` (for `sweep-beta0 --mark`): "
              f"{[round(v, 4) for v in result['beta0']]}.", "",
              "![beta0 fit](beta0.png)", ""]
    return "\n".join(lines)


__all__ = [
    "ESTIMATES",
    "Beta0FitConfig",
    "beta0_report",
    "fit_beta0_run",
    "plot_beta0_fit",
]
