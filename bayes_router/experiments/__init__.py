"""Experiments: studies that orchestrate the layers below into run directories.

Each module turns one study into a folder of JSON results, PNG figures and a ``report.md``:
``runs`` (one training run, its evaluation and the corpus report), ``phase1`` (Bayesian against
prior-free routing over seeds), ``sweep`` (the beta0 sweep), ``report`` (calibration and
routing-uncertainty analysis of runs), ``variance_lab`` (the gradient-variance study) and
``beta0_fit`` (empirical Bayes on a run). They compute nothing of their own: models, estimators,
metrics and plots come from :mod:`bayes_router.models`, :mod:`bayes_router.inference` and
:mod:`bayes_router.analysis`.
"""
