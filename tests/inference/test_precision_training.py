"""Training in bfloat16 and float16: the same run to rounding, float16's loss scaling (overflow
skips, a run that overflows at every scale stops), resume with the scaler's state."""

import importlib

import pytest
import torch

from bayes_router.inference.checkpoint import load_checkpoint
from bayes_router.inference.train import TrainingDiverged, train
from tests.helpers import tiny_configs

train_module = importlib.import_module("bayes_router.inference.train")


def _cfgs(data, **train_kwargs):
    return tiny_configs(data, "unused", **{"steps": 8, "eval_every": 8, "checkpoint_every": 4,
                                           **train_kwargs})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_run_follows_the_float32_run(tiny_data, dtype):
    model_cfg, exact_cfg = _cfgs(tiny_data)
    _, low_cfg = _cfgs(tiny_data, dtype=dtype)
    exact = train(model_cfg, exact_cfg, tiny_data, progress=False)
    low = train(model_cfg, low_cfg, tiny_data, progress=False)
    exact_losses = [r["loss"] for r in exact.history]
    low_losses = [r["loss"] for r in low.history]
    assert low_losses != exact_losses  # it did compute in the lower precision
    # the same batches and noise: the losses agree to rounding (measured gaps ~1e-3 relative)
    for a, b in zip(exact_losses, low_losses, strict=True):
        assert abs(a - b) < 1e-2 * abs(a)
    assert ("loss_scale" in low.history[0]) == (dtype == "float16")
    assert all(p.dtype == torch.float32 for p in low.model.parameters())


def _huge_scaler(scale):
    def make(device, dtype):
        return torch.amp.GradScaler(torch.device(device).type, init_scale=scale)
    return make


def test_float16_overflow_skips_the_update_and_lowers_the_scale(tiny_data, monkeypatch):
    # 2^24 x the loss overflows the float16 gradients for ~8 steps (the scale that fits is
    # about torch's default 2^16), then trains
    monkeypatch.setattr(train_module, "gradient_scaler", _huge_scaler(2.0 ** 24))
    model_cfg, train_cfg = _cfgs(tiny_data, dtype="float16", steps=40, eval_every=40,
                                 checkpoint_every=40)
    result = train(model_cfg, train_cfg, tiny_data, progress=False)
    overflow = [r["overflow"] for r in result.history]
    scales = [r["loss_scale"] for r in result.history]
    assert overflow[0] and not overflow[-1]
    assert 0 < sum(overflow) < train_module.MAX_OVERFLOWS
    assert scales[0] == 2.0 ** 23  # halved after the first overflow
    assert all(b <= a for a, b, skipped in zip(scales, scales[1:], overflow[1:],
                                               strict=False) if skipped)
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-5:]) < sum(losses[:5])  # the steps after the overflows trained


def test_float16_overflowing_at_every_scale_stops_the_run(tiny_data, monkeypatch, tmp_path):
    monkeypatch.setattr(train_module, "gradient_scaler", _huge_scaler(2.0 ** 100))
    monkeypatch.setattr(train_module, "MAX_OVERFLOWS", 3)
    model_cfg, train_cfg = _cfgs(tiny_data, dtype="float16", steps=10)
    with pytest.raises(TrainingDiverged, match="3 float16 overflows in a row") as error:
        train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path, progress=False)
    assert error.value.step == 3


def test_float16_resume_continues_with_the_scalers_state(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "gradient_scaler", _huge_scaler(2.0 ** 28))
    model_cfg, train_cfg = _cfgs(tiny_data, dtype="float16")
    whole = train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "a", progress=False)
    train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "b", progress=False, max_steps=4)
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["scaler"]
    assert saved["scale"] == whole.history[3]["loss_scale"] < 2.0 ** 28
    resumed = train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "b", progress=False,
                    resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    assert [r["loss_scale"] for r in resumed.history] == [r["loss_scale"] for r in whole.history]
    for (name, p), (_, q) in zip(whole.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
