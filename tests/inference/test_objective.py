"""The one SVI step: per-token scaling, clipping, and no update when anything is not finite;
its options, checked once when built."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.objective import StepOptions, svi_step


class Tiny(nn.Module):
    """``obs ~ Normal(w + v, 1)`` per token; no latents, so the loss is the NLL."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.v = nn.Parameter(torch.tensor(-0.2))

    def model(self, x, y, dataset_size):
        with pyro.plate("batch", dataset_size, subsample=torch.arange(x.shape[0]), dim=-1):
            pyro.sample("obs", dist.Normal(self.w + self.v, 1.0).expand(x.shape).to_event(1),
                        obs=y)

    def guide(self, x, y, dataset_size):
        pass


def _steps(model, count: int, **options):
    """``count`` SGD steps (learning rate 0.1) on ``x = 0``, ``y = 1`` (2 sequences of 3), with
    one :class:`StepOptions` built from ``options`` for all of them."""
    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    elbo = get_estimator("reparam-mc").make_elbo(max_plate_nesting=1)
    step_options = StepOptions(dataset_size=10, **options)
    with pyro.settings.context(module_local_params=True):
        return [svi_step(elbo, model, x, y, optimiser, step_options) for _ in range(count)]


def _step(model, **options):
    return _steps(model, 1, **options)[0]


def test_the_loss_is_per_token_and_the_step_is_taken():
    model = Tiny()
    result = _step(model)
    # per token: -log N(1; 0.3, 1) = 0.5 log(2 pi) + 0.49 / 2
    assert result.loss == pytest.approx(0.5 * math.log(2 * math.pi) + 0.245, rel=1e-6)
    assert result.failed is None and not torch.equal(model.w.detach(), torch.tensor(0.5))


def test_a_non_finite_gradient_outside_the_clipped_set_still_stops_the_step():
    model = Tiny()
    model.v.register_hook(lambda grad: grad * float("nan"))
    result = _step(model, grad_clip=1.0, clip_parameters=[model.w])
    assert result.failed == "gradient norm"
    assert torch.equal(model.w.detach(), torch.tensor(0.5))  # nothing was updated
    assert torch.equal(model.v.detach(), torch.tensor(-0.2))


def test_clip_parameters_given_as_an_iterator_serve_every_step():
    model = Tiny()
    results = _steps(model, 2, grad_clip=10.0, clip_parameters=iter([model.w]))
    # d/dw of the per-token 0.5 (1 - w - v)^2 is -(1 - w - v): 0.7 at (0.5, -0.2); SGD moves
    # w and v by 0.07 each, so 1 - w - v is 0.56 at the second step
    assert [r.grad_norm for r in results] == pytest.approx([0.7, 0.56], rel=1e-5)


def test_micro_batches_must_divide_each_batch():
    with pytest.raises(ValueError, match=r"micro_batches \(4\) must divide the batch"):
        _step(Tiny(), micro_batches=4)


@pytest.mark.parametrize(("field", "value"), [
    ("dataset_size", 0), ("dataset_size", 2.5), ("micro_batches", 0), ("micro_batches", True),
    ("grad_clip", 0.0), ("grad_clip", math.inf), ("grad_clip", math.nan)])
def test_step_options_are_checked_when_built(field, value):
    options = {"dataset_size": 10, field: value}
    with pytest.raises(ValueError, match=field):
        StepOptions(**options)
