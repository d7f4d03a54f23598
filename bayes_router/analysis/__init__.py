"""Calibration metrics, selective prediction, diagnostics and plots of routed models.

The routing metrics (:mod:`bayes_router.core.routing`), the uncertainty decomposition
(:mod:`bayes_router.core.dirichlet`) and the categorical KL (:mod:`bayes_router.core.categorical`)
live in the leaf layer and are imported from there: each function has one public home.
"""

from bayes_router.analysis.calibration_metrics import (
    ReliabilityCurve,
    bootstrap_ci,
    brier_score,
    classwise_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_curve,
    reliability_curve_from_confidence,
    squared_calibration_error,
    squared_calibration_error_from_confidence,
    top_label_outcomes,
)
from bayes_router.analysis.diagnostics import (
    auroc,
    mean_by_uncertainty_bin,
    routing_accuracy_by_decile,
    spearman,
    top_fraction_mask,
    uncertainty_diagnostics,
)
from bayes_router.analysis.plots import (
    plot_beta0_sensitivity,
    plot_estimator_bars,
    plot_expert_share,
    plot_reliability_diagram,
    plot_risk_coverage,
    plot_routing_along_text,
    plot_routing_simplex,
    plot_smooth_reliability_diagram,
    plot_uncertainty_strip,
    plot_uncertainty_vs_damage,
)
from bayes_router.analysis.selective import (
    RiskCoverageCurve,
    area_under_risk_coverage,
    excess_area_under_risk_coverage,
    oracle_area_under_risk_coverage,
    risk_coverage_curve,
    selective_prediction_summary,
)
from bayes_router.analysis.smooth_calibration import (
    SmoothReliabilityCurve,
    smooth_calibration_bandwidth,
    smooth_calibration_error,
    smooth_calibration_error_from_confidence,
    smooth_calibration_summary,
    smooth_reliability_curve,
)

__all__ = [
    # calibration metrics
    "ReliabilityCurve",
    "SmoothReliabilityCurve",
    "bootstrap_ci",
    "brier_score",
    "classwise_calibration_error",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_curve",
    "reliability_curve_from_confidence",
    "smooth_calibration_bandwidth",
    "smooth_calibration_error",
    "smooth_calibration_error_from_confidence",
    "smooth_calibration_summary",
    "smooth_reliability_curve",
    "squared_calibration_error",
    "squared_calibration_error_from_confidence",
    "top_label_outcomes",
    # selective prediction
    "RiskCoverageCurve",
    "area_under_risk_coverage",
    "excess_area_under_risk_coverage",
    "oracle_area_under_risk_coverage",
    "risk_coverage_curve",
    "selective_prediction_summary",
    # diagnostics
    "auroc",
    "mean_by_uncertainty_bin",
    "routing_accuracy_by_decile",
    "spearman",
    "top_fraction_mask",
    "uncertainty_diagnostics",
    # plots
    "plot_beta0_sensitivity",
    "plot_estimator_bars",
    "plot_expert_share",
    "plot_reliability_diagram",
    "plot_risk_coverage",
    "plot_routing_along_text",
    "plot_routing_simplex",
    "plot_smooth_reliability_diagram",
    "plot_uncertainty_strip",
    "plot_uncertainty_vs_damage",
]
