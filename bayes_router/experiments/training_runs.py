"""Training runs: train a routed LM into a run directory (:func:`train_run`), or many of them,
reusing finished ones, in a pool of processes (:func:`train_runs`).

A run directory holds ``config.json`` (configurations, seed, versions), ``checkpoint.pt``,
``history.json`` (the loss trace), ``metrics.json`` (held-out metrics under soft and hard routing,
the timed hard-routing forward pass and decoding step, each against full-only), ``training.png``
and ``report.md``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bayes_router.core.validation import check_int
from bayes_router.data.tokens import TokenData
from bayes_router.experiments.json_files import read_json, versions, write_json
from bayes_router.experiments.run_evaluation import EVAL_BATCHES, held_out_metrics
from bayes_router.experiments.run_loading import load_data, read_config_json
from bayes_router.experiments.run_report import plot_training, run_report_markdown
from bayes_router.experiments.rundir import run_lock
from bayes_router.inference.build import check_compatible
from bayes_router.inference.checkpoint import CHECKPOINT_NAME, config_differences
from bayes_router.inference.distributed import Distributed, resolve_device
from bayes_router.inference.train import TrainingDiverged, train
from bayes_router.inference.train_config import TrainConfig, gated_training_bias, objective_label
from bayes_router.models.config import TinyLMConfig

logger = logging.getLogger(__name__)


def corpus_path(spec: str) -> str | None:
    """The absolute path a corpus spec names (``None`` for ``stdlib`` and synthetic tasks)."""
    if spec == "stdlib" or spec.startswith("synthetic:"):
        return None
    return str(Path(spec).resolve())


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
    metrics = held_out_metrics(result.model, data, train_cfg, eval_batches)
    metrics.update({"router": train_cfg.router, "steps": result.step,
                    "train_seconds": result.seconds,
                    "final_loss": result.history[-1]["loss"] if result.history else None,
                    "costs": result.model.costs.tolist(),
                    "gradient_bias": config["gradient_bias"], "objective": config["objective"]})
    if getattr(result.model, "learn_beta0", False):
        metrics["beta0"] = result.model.beta0.detach().tolist()
    write_json(out_dir / "metrics.json", metrics)
    plot_training(result.history, result.evaluations, out_dir / "training.png")
    (out_dir / "report.md").write_text(run_report_markdown(config, metrics, result.evaluations))
    return metrics


def read_finished_metrics(run_dir: Path, model_cfg: TinyLMConfig, train_cfg: TrainConfig
                          ) -> dict | None:
    """The metrics of a finished run of exactly this configuration in ``run_dir``, ``None`` if
    it holds no finished run.

    :raises ValueError: if it holds a run (finished or not) of another configuration (a
        partial run may differ in ``steps`` only).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        return None
    saved_model, saved_train = read_config_json(run_dir)
    # through the dataclasses, so that fields added since the run was written take defaults
    differ = (config_differences(saved_model, model_cfg, "model.")
              + config_differences(saved_train, train_cfg, "train."))
    finished = (run_dir / "metrics.json").exists()
    if differ and (finished or differ != ["train.steps"]):
        raise ValueError(f"{run_dir} holds a run with another configuration (fields "
                         f"{differ}); choose another --out directory")
    return read_json(run_dir / "metrics.json", dict) if finished else None


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
    check_int("jobs", jobs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("phase1 and sweep-beta0 do not run under torchrun: they train many "
                         "small runs, in parallel with --jobs; use torchrun for one large "
                         "`bayes-router train`")
    results: list[dict | None] = []
    todo = []
    for i, (model_cfg, train_cfg, run_dir) in enumerate(specs):
        done = read_finished_metrics(run_dir, model_cfg, train_cfg) if resume else None
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
