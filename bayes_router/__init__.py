"""bayes-router: Bayesian per-token attention routing with compute-aware Dirichlet priors."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
