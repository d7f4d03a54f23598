"""A score-function estimator's decaying-average baselines live in Pyro's global param store:
each run starts from none (not from a run before it in the same process), and a checkpoint
carries them, so a killed and resumed run continues identically."""

import importlib

import pyro

from bayes_router.inference.estimators.base import BASELINE_PREFIX, running_baselines
from bayes_router.inference.train import train
from tests.helpers import tiny_configs


def _config(tiny_data, tiny_corpus, steps=4):
    return tiny_configs(tiny_data, tiny_corpus, estimator="score-baseline", steps=steps,
                        eval_every=steps, checkpoint_every=1)


def _trajectory(result):
    return [(r["loss"], r["grad_norm"]) for r in result.history]


def test_a_run_does_not_inherit_the_baselines_of_the_run_before(tiny_data, tiny_corpus):
    model_cfg, train_cfg = _config(tiny_data, tiny_corpus)
    first = train(model_cfg, train_cfg, tiny_data, progress=False)
    assert running_baselines()  # the estimator keeps a baseline per Dirichlet site
    second = train(model_cfg, train_cfg, tiny_data, progress=False)
    assert _trajectory(second) == _trajectory(first)


def test_a_resumed_run_continues_with_its_own_baselines(tiny_data, tiny_corpus, tmp_path):
    model_cfg, train_cfg = _config(tiny_data, tiny_corpus)
    whole = train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "a", progress=False)
    train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "b", progress=False, max_steps=2)
    pyro.clear_param_store()  # a new process: nothing left in the store
    resumed = train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "b", resume=True,
                    progress=False)
    assert _trajectory(resumed) == _trajectory(whole)
    # and another run's baselines in the store do not leak into a resumed one
    train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "c", progress=False, max_steps=2)
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith(BASELINE_PREFIX)]:
        store[name] = store[name].detach() + 100.0
    again = train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "c", resume=True,
                  progress=False)
    assert _trajectory(again) == _trajectory(whole)


def test_the_comparison_can_fail(tiny_data, tiny_corpus, tmp_path, monkeypatch):
    """Baselines moved by 100 between the halves change the resumed trajectory: the equality
    above is a real check of the restored state."""
    # the package re-exports the function `train`, which hides the module of that name
    train_module = importlib.import_module("bayes_router.inference.train")
    model_cfg, train_cfg = _config(tiny_data, tiny_corpus)
    whole = train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "a", progress=False)
    train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "b", progress=False, max_steps=2)
    real = train_module.restore_running_baselines

    def shifted(state, device=None):
        real({name: value + 100.0 for name, value in state.items()}, device)

    monkeypatch.setattr(train_module, "restore_running_baselines", shifted)
    resumed = train(model_cfg, train_cfg, tiny_data, out_dir=tmp_path / "b", resume=True,
                    progress=False)
    assert _trajectory(resumed)[:2] == _trajectory(whole)[:2]
    assert all(r[1] != w[1] for r, w in zip(_trajectory(resumed)[2:], _trajectory(whole)[2:],
                                              strict=True))  # every later gradient moved
