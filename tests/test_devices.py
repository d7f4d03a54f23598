"""Every library entry point on every device type this machine has (CPU here; the CUDA and MPS
cases run where those exist, `make gpu-check`): training, evaluation, the analysis pass and a
checkpoint written on one device and loaded onto another."""

import pytest
import torch

from bayes_router.experiments.run_evaluation import evaluate_run
from bayes_router.experiments.run_loading import load_run_dir
from bayes_router.experiments.training_runs import train_run
from bayes_router.inference.evaluate import collect_token_arrays, timed_forward
from tests.helpers import tiny_configs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
    ["mps"] if hasattr(torch.backends, "mps") and torch.backends.mps.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def device_run(request, tmp_path_factory, tiny_data, tiny_corpus):
    device = request.param
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=3, eval_every=3,
                                        checkpoint_every=3)
    out = tmp_path_factory.mktemp(f"run-{device}") / "run"
    metrics = train_run(model_cfg, train_cfg, out, progress=False, data=tiny_data,
                        eval_batches=1, device=device)
    return device, out, metrics


def test_training_on_the_device_writes_a_finished_run(device_run):
    device, out, metrics = device_run
    assert metrics["steps"] == 3 and metrics["soft"]["val_nll"] > 0
    assert metrics["timing"]["routed_seconds"] > 0


@pytest.mark.parametrize("load_on", DEVICES)
def test_a_checkpoint_loads_onto_any_device_and_evaluates_alike(device_run, load_on):
    _, out, _ = device_run
    model, *_, data = load_run_dir(out, device=load_on)
    assert next(model.parameters()).device.type == load_on
    metrics = evaluate_run(out, mode="hard", max_batches=1, device=load_on)
    reference = evaluate_run(out, mode="hard", max_batches=1, device="cpu")
    assert metrics["val_nll"] == pytest.approx(reference["val_nll"], rel=1e-4)
    arrays = collect_token_arrays(model, data, "val", 32, max_batches=1, num_samples=2)
    assert arrays.probs.shape[0] == arrays.targets.shape[0]
    x, _ = next(data.eval_batches("val", 2, 32))
    assert timed_forward(model, x, repeats=1)["routed_seconds"] > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_training_and_evaluation_on_the_device(device, dtype, tmp_path, tiny_data,
                                                             tiny_corpus):
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=2, eval_every=2,
                                        checkpoint_every=2, dtype=dtype)
    metrics = train_run(model_cfg, train_cfg, tmp_path / "run", progress=False, data=tiny_data,
                        eval_batches=1, device=device)
    assert metrics["soft"]["val_nll"] > 0
    low = evaluate_run(tmp_path / "run", max_batches=1, device=device, dtype=dtype)
    exact = evaluate_run(tmp_path / "run", max_batches=1, device=device)
    assert low["dtype"] == dtype and exact["dtype"] == "float32"
    assert low["val_nll"] == pytest.approx(exact["val_nll"], rel=1e-2)
    assert (tmp_path / "run" / f"metrics_val_soft_{dtype}.json").exists()
