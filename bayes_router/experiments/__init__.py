"""Experiments: studies that orchestrate the layers below into run directories.

Each study turns into a folder of JSON results, PNG figures and a ``report.md``:
``training_runs`` (training one run, or many in a pool of processes), ``run_evaluation`` (a run's
held-out metrics and ``evaluate_run``), ``corpus_report`` (statistics of a corpus), ``phase1``
(Bayesian against prior-free routing over seeds), ``sweep`` (the beta0 sweep), ``report``
(calibration and routing-uncertainty analysis of runs), ``variance_lab`` (the gradient-variance
study), ``beta0_fit`` (empirical Bayes on a run), ``evidence`` (counterfactual gains against
commitment costs), ``generate`` (a run's text, decoded with caches) and ``gate_sweep`` (NLL
against the decoding step of the uncertainty gate). Shared by them: ``json_files`` (strict JSON
and the versions a result records), ``run_loading`` (a run directory read back), ``run_report``
(a run's markdown and figures) and ``rundir`` (one writer per folder).

They compute nothing of their own: models, estimators, metrics and plots come from
:mod:`bayes_router.models`, :mod:`bayes_router.inference` and :mod:`bayes_router.analysis`.
"""
