import matplotlib
import pyro
import pytest
import torch

matplotlib.use("Agg")
# The test models are tiny: one thread avoids OpenMP spin-waits when the machine is shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Fresh param store, validation on and a fixed seed before every test."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()
