"""Data-parallel training on torch.distributed (gloo, 2 CPU processes): after k steps the
parameters equal a one-process run over the same global batch, for the Bayesian router and the
prior-free one, and a killed-and-resumed 2-process run continues identically."""

import contextlib
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bayes_router.data.tokens import token_data
from bayes_router.inference.checkpoint import CheckpointError, load_checkpoint
from bayes_router.inference.distributed import Distributed, resolve_device, shard
from bayes_router.inference.train import train
from tests.conftest import TINY_TEXT
from tests.helpers import tiny_configs

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process_group(rank, world, port, out):
    """A gloo group for the body; after it, both ranks pass a barrier (every collective done),
    each marks ``rank<r>.finished`` in ``out``, and the group is torn down."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        try:
            dist.barrier()
            Path(out, f"rank{rank}.finished").touch()
        finally:
            dist.destroy_process_group()


def _spawn(fn, *args, out):
    """Run ``fn(rank, *args)`` on 2 spawned processes. gloo's teardown can abort a process
    after its work is done (SIGABRT "terminate called without an active exception" from a
    C++ thread at exit, seen about once in 50 runs on a loaded machine, after the barrier):
    such a signal is tolerated when both ranks marked themselves finished, i.e. passed their
    last collective with their results written. A signal before that, or any Python exception,
    still fails the test."""
    try:
        mp.start_processes(fn, args=args, nprocs=2, start_method="spawn")
    except mp.ProcessExitedException as error:
        if not all(Path(out, f"rank{r}.finished").exists() for r in range(2)):
            raise
        warnings.warn(f"ignored after both ranks finished: {error}", stacklevel=2)


def _worker(rank, world, port, corpus, out, router, steps, max_steps, resume, lr=1e-2,
            dtype="float32"):
    with _process_group(rank, world, port, out):
        data = token_data(corpus)
        model_cfg, train_cfg = tiny_configs(data, corpus, router=router, steps=steps,
                                            checkpoint_every=1, eval_every=steps,
                                            lr=lr, dtype=dtype)
        result = train(model_cfg, train_cfg, data, out_dir=out, progress=False,
                       max_steps=max_steps, resume=resume)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()},
                       os.path.join(out, "final_state.pt"))


def _two_processes(tmp_path, corpus, router, steps=STEPS, max_steps=None, resume=False,
                   dtype="float32"):
    out = tmp_path / "ddp"
    out.mkdir(parents=True, exist_ok=True)
    _spawn(_worker, 2, _free_port(), str(corpus), str(out), router, steps, max_steps, resume,
           1e-2, dtype, out=out)
    return torch.load(out / "final_state.pt", weights_only=True)


def _one_process(tiny_data, tiny_corpus, router, micro_batches, steps=STEPS, dtype="float32"):
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, router=router, steps=steps,
                                        eval_every=steps, micro_batches=micro_batches,
                                        dtype=dtype)
    return train(model_cfg, train_cfg, tiny_data, progress=False).model.state_dict()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp-corpus") / "corpus.txt"
    path.write_text(TINY_TEXT)
    return path


@pytest.mark.parametrize("router", ["bayesian", "prior-free"])
def test_two_processes_equal_one_process_over_the_same_global_batch(router, corpus, tmp_path):
    data = token_data(str(corpus))
    ddp = _two_processes(tmp_path, corpus, router)
    single = _one_process(data, corpus, router, micro_batches=2)
    assert set(ddp) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # and the comparison can fail: one process without the shards draws other noise or none
    if router == "bayesian":
        plain = _one_process(data, corpus, router, micro_batches=1)
        assert any(not torch.allclose(plain[n], single[n], atol=1e-6) for n in single)


def test_float16_two_processes_follow_one_process_with_loss_scaling(corpus, tmp_path):
    """The ranks average the *scaled* gradients and unscale them after: the same losses and
    loss scales as one process accumulating two scaled micro-batches, and parameters within a
    fifth of one Adam step of its (not bit for bit: Adam's first step, g / (|g| + eps),
    magnifies float16's rounding in the few gradient entries that nearly cancel between the
    two shards; measured 3.7e-4 at most). A lost, doubled or unscaled update would be a whole
    step (lr = 1e-2 per entry) off."""
    data = token_data(str(corpus))
    ddp = _two_processes(tmp_path, corpus, "bayesian", dtype="float16")
    ddp_history = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["history"]
    model_cfg, train_cfg = tiny_configs(data, corpus, router="bayesian", steps=STEPS,
                                        eval_every=STEPS, micro_batches=2, dtype="float16")
    single = train(model_cfg, train_cfg, data, progress=False)
    initial = train(model_cfg, train_cfg, data, progress=False, max_steps=0).model.state_dict()
    assert [r["loss_scale"] for r in ddp_history] == [r["loss_scale"] for r in single.history]
    assert not any(r["overflow"] for r in ddp_history + single.history)
    for a, b in zip(ddp_history, single.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    lr = train_cfg.lr
    for name, value in single.model.state_dict().items():
        assert float((ddp[name] - value).abs().max()) < lr / 5, name
    assert max(float((v - initial[k]).abs().max())
               for k, v in single.model.state_dict().items()) > lr  # the steps did move


def test_a_killed_two_process_run_resumes_identically(corpus, tmp_path):
    uninterrupted = _two_processes(tmp_path / "a", corpus, "bayesian", steps=4)
    _two_processes(tmp_path / "b", corpus, "bayesian", steps=4, max_steps=2)
    assert load_checkpoint(tmp_path / "b" / "ddp" / "checkpoint.pt")["step"] == 2
    resumed = _two_processes(tmp_path / "b", corpus, "bayesian", steps=4, resume=True)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_another_world_size_is_refused(corpus, tmp_path):
    _two_processes(tmp_path, corpus, "prior-free", steps=2)
    data = token_data(str(corpus))
    model_cfg, train_cfg = tiny_configs(data, corpus, router="prior-free", steps=4,
                                        checkpoint_every=1, eval_every=2)
    with pytest.raises(CheckpointError, match="written by a run on 2 process"):
        train(model_cfg, train_cfg, data, out_dir=tmp_path / "ddp", resume=True, progress=False)


def _mismatched(rank, world, port, corpus, out):
    _worker(rank, world, port, corpus, out, "prior-free", 2, None, False, lr=1e-2 * (1 + rank))


def test_ranks_with_different_configurations_are_refused(corpus, tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="the configuration differs between "
                                                         "ranks: ranks \\[1\\] disagree"):
        mp.start_processes(_mismatched, args=(2, _free_port(), str(corpus), str(tmp_path)),
                           nprocs=2, start_method="spawn")


def test_the_world_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="world size 3 must divide batch_size 4"):
        shard(torch.zeros(4, 2), 0, 3)
    with pytest.raises(ValueError, match="micro_batches"):
        tiny_configs(token_data("synthetic:recall"), "x", micro_batches=3)


def test_devices_resolve_or_say_why_not():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        resolve_device("tpu")
    assert Distributed().is_main and not Distributed().active


def _failing_checkpoint(rank, world, port, corpus, out):
    import importlib

    # the package re-exports the function `train`, which hides the module of that name
    train_module = importlib.import_module("bayes_router.inference.train")

    if rank == 0:  # rank 0's disk refuses the checkpoint of step 2
        real = train_module.save_checkpoint

        def refuse(path, payload):
            if payload["step"] == 2:
                raise OSError(28, "No space left on device", str(path))
            real(path, payload)

        train_module.save_checkpoint = refuse
    try:
        _worker(rank, world, port, corpus, out, "prior-free", 4, None, False)
    except (OSError, RuntimeError) as error:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(f"{type(error).__name__}: {error}")


def _refused_shard(rank, world, port, corpus, out):
    from bayes_router.inference import objective

    if rank == 1:  # rank 1's guide is refused by torch's validation at step 2
        real = objective.loss_and_surrogate
        calls = {"n": 0}

        def refuse(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise ValueError("Expected parameter concentration (Tensor of shape (2, 32, 3)) "
                                 "of distribution Dirichlet to satisfy the constraint "
                                 "IndependentConstraint(GreaterThan(lower_bound=0.0), 1), but "
                                 "found invalid values:\ntensor([nan])")
            return real(*args, **kwargs)

        objective.loss_and_surrogate = refuse
    try:
        _worker(rank, world, port, corpus, out, "bayesian", 4, None, False)
    except RuntimeError as error:  # TrainingDiverged
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(f"{type(error).__name__} {error.step} {error.quantity}: {error}")


def test_a_shard_refused_by_distribution_validation_stops_every_rank(corpus, tmp_path):
    """Rank 1's Dirichlet is refused mid-step: the averaged loss is NaN on every rank, so rank
    1 stops on the refusal and rank 0 on the loss, at the same step, instead of rank 0 waiting
    at the next collective."""
    _spawn(_refused_shard, 2, _free_port(), str(corpus), str(tmp_path), out=tmp_path)
    rank0 = (tmp_path / "rank0.txt").read_text()
    rank1 = (tmp_path / "rank1.txt").read_text()
    assert rank1.startswith("TrainingDiverged 2 distribution parameters: ")
    assert "Expected parameter concentration" in rank1
    assert rank0.startswith("TrainingDiverged 2 loss: ")


def test_a_failure_on_rank_0_stops_every_rank(corpus, tmp_path):
    """Rank 0 cannot write a checkpoint: rank 1 stops too instead of waiting at the barrier."""
    _spawn(_failing_checkpoint, 2, _free_port(), str(corpus), str(tmp_path), out=tmp_path)
    assert "No space left on device" in (tmp_path / "rank0.txt").read_text()
    assert "another rank failed at the checkpoint of step 2" in (
        tmp_path / "rank1.txt").read_text()


def _baseline_worker(rank, world, port, corpus, out, estimator):
    import pyro

    from bayes_router.inference.estimators import get_estimator
    from bayes_router.inference.objective import AuxiliaryOptimiser

    seen = {}
    real_init = AuxiliaryOptimiser.__init__

    def keep(self, *args, **kwargs):  # remember the run's auxiliary state to report it
        real_init(self, *args, **kwargs)
        seen["aux"] = self

    AuxiliaryOptimiser.__init__ = keep
    with _process_group(rank, world, port, out):
        data = token_data(corpus)
        model_cfg, train_cfg = tiny_configs(data, corpus, estimator=estimator, steps=3,
                                            eval_every=3, checkpoint_every=3)
        with pyro.settings.context(module_local_params=True):
            train(model_cfg, train_cfg, data, progress=False)
        state = [t.detach().clone() for t in seen["aux"].state_tensors()]
        assert get_estimator(estimator).owns_state
        torch.save(state, os.path.join(out, f"state{rank}.pt"))


@pytest.mark.parametrize("estimator", ["score-baseline", "score-nn-baseline"])
def test_estimator_baselines_stay_one_state_across_ranks(corpus, tmp_path, estimator):
    """Each rank's shard moves the running (and learned) baselines its own way; after every
    step the ranks average them, so both hold the same state."""
    _spawn(_baseline_worker, 2, _free_port(), str(corpus), str(tmp_path), estimator,
           out=tmp_path)
    state0, state1 = (torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in (0, 1))
    assert len(state0) == len(state1) >= 2  # a running average per layer at least
    for a, b in zip(state0, state1, strict=True):
        assert torch.equal(a, b)
    assert any(bool(t.abs().sum() > 0) for t in state0)
