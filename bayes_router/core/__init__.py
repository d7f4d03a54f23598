"""The leaf layer: Dirichlet maths, routing metrics and array checks (numpy, scipy, torch only).

Every other subpackage may import from here; nothing here imports from the rest of the package.
"""

from bayes_router.core.commitment import (
    CommitmentCost,
    commitment_cost,
    commitment_costs,
    floor_kl,
)
from bayes_router.core.dirichlet import (
    SAMPLING_DTYPE,
    RoutingUncertainty,
    aleatoric_uncertainty,
    dirichlet_kl,
    dirichlet_kl_to_prior,
    epistemic_uncertainty,
    expected_log_alpha,
    fused_dirichlet_kl,
    log_beta,
    normalised_entropy,
    routing_uncertainty,
    total_concentration,
    total_uncertainty,
)
from bayes_router.core.routing import (
    expected_flop_cost,
    expert_share,
    projected_flop_cost,
    routing_entropy,
)

__all__ = [
    "SAMPLING_DTYPE",
    "CommitmentCost",
    "RoutingUncertainty",
    "aleatoric_uncertainty",
    "commitment_cost",
    "commitment_costs",
    "dirichlet_kl",
    "dirichlet_kl_to_prior",
    "epistemic_uncertainty",
    "expected_flop_cost",
    "expected_log_alpha",
    "fused_dirichlet_kl",
    "expert_share",
    "floor_kl",
    "log_beta",
    "normalised_entropy",
    "projected_flop_cost",
    "routing_entropy",
    "routing_uncertainty",
    "total_concentration",
    "total_uncertainty",
]
