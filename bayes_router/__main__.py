"""``python -m bayes_router``: the command line (also ``torchrun -m bayes_router``)."""

import sys

from bayes_router.cli import main

sys.exit(main())
