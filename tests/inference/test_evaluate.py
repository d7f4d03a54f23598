"""evaluate(): the routing metrics of each mode describe the weights that mode applied."""

import pytest
import torch
from pyro.settings import context

from bayes_router.inference.evaluate import evaluate
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.prior_free import PriorFreeRoutedLM
from tests.helpers import tiny_configs


@pytest.mark.parametrize("router", ["bayesian", "prior-free"])
def test_hard_rows_describe_the_one_hot_weights_that_ran(router, tiny_data, tiny_corpus):
    model_cfg, _ = tiny_configs(tiny_data, tiny_corpus)
    with context(module_local_params=True):
        torch.manual_seed(0)
        model = (BayesianRoutedLM(model_cfg) if router == "bayesian"
                 else PriorFreeRoutedLM(model_cfg))
        soft = evaluate(model, tiny_data, "val", 32, mode="soft", max_batches=2)
        hard = evaluate(model, tiny_data, "val", 32, mode="hard", max_batches=2)
    # an untrained router mixes: its soft weights have entropy and an expected cost between
    assert soft["routing_entropy"] > 50
    assert soft["expected_flop_cost"] != pytest.approx(soft["projected_flop_cost"], abs=1.0)
    # hard routing ran one expert per token: no entropy, and expected cost == projected cost
    assert hard["routing_entropy"] == 0.0
    assert hard["expected_flop_cost"] == pytest.approx(hard["projected_flop_cost"], rel=1e-12)
    assert hard["projected_flop_cost"] == pytest.approx(soft["projected_flop_cost"])
    assert hard["expert_share"] == soft["expert_share"]
