"""The gradient-variance lab: how noisy, how costly and (where the exact gradient is known) how
biased each ELBO estimator of :mod:`bayes_router.inference.estimators` is.

It draws many independent gradient estimates at one fixed point and summarises them
(:mod:`~bayes_router.variance.gradient_stats`: variance, signal-to-noise, efficiency), on the
routed LM (:mod:`~bayes_router.variance.lm_variance`: per parameter group, against the number
of particles and ``beta0``) and on the conjugate toys, whose exact gradients are known
(:mod:`~bayes_router.variance.toy`, :mod:`~bayes_router.variance.toy_two_site`;
:mod:`~bayes_router.variance.toy_variance`: bias, and power laws in the number of particles).
Training does not use it: it sits above :mod:`bayes_router.inference` and below
:mod:`bayes_router.analysis`, whose plots draw its results; the study that writes them into a
folder is :mod:`bayes_router.experiments.variance_lab`.

A sweep holds, per estimator, a list aligned with its axis: ``sweep[axis][i]`` is measured by
``sweep["estimators"][name][i]``, a skipped point being ``{"skipped": reason}``.
"""

from bayes_router.variance.gradient_stats import (
    REFERENCE,
    GradientSummary,
    add_relative,
    snr_noise_floor,
    summarise_gradients,
)
from bayes_router.variance.lm_variance import (
    DEFAULT_PARTICLE_ESTIMATORS,
    DEFAULT_SWEEP_ESTIMATORS,
    GROUP_LABELS,
    GROUPS,
    aligned_points,
    check_estimators,
    gradient_variance,
    lab_model,
    parameter_groups,
    variance_vs_beta0,
    variance_vs_particles,
)
from bayes_router.variance.toy import (
    gradient_draws,
    toy_elbo,
    toy_elbo_grad,
    toy_guide,
    toy_log_evidence,
    toy_model,
    toy_posterior,
)
from bayes_router.variance.toy_two_site import (
    two_site_elbo,
    two_site_elbo_grad,
    two_site_gradient_draws,
    two_site_guide,
    two_site_log_evidence,
    two_site_model,
)
from bayes_router.variance.toy_variance import (
    EXPECTED_SLOPES,
    PowerLawFit,
    bootstrap_summaries,
    fit_power_law,
    local_slopes,
    toy_gradient_variance,
    toy_variance_vs_particles,
)

__all__ = [
    "DEFAULT_PARTICLE_ESTIMATORS",
    "DEFAULT_SWEEP_ESTIMATORS",
    "EXPECTED_SLOPES",
    "GROUPS",
    "GROUP_LABELS",
    "REFERENCE",
    "GradientSummary",
    "PowerLawFit",
    "add_relative",
    "aligned_points",
    "bootstrap_summaries",
    "check_estimators",
    "fit_power_law",
    "gradient_draws",
    "gradient_variance",
    "lab_model",
    "local_slopes",
    "parameter_groups",
    "snr_noise_floor",
    "summarise_gradients",
    "toy_elbo",
    "toy_elbo_grad",
    "toy_gradient_variance",
    "toy_guide",
    "toy_log_evidence",
    "toy_model",
    "toy_posterior",
    "toy_variance_vs_particles",
    "two_site_elbo",
    "two_site_elbo_grad",
    "two_site_gradient_draws",
    "two_site_guide",
    "two_site_log_evidence",
    "two_site_model",
    "variance_vs_beta0",
    "variance_vs_particles",
]
