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


@pytest.fixture
def local_params():
    """Pyro with ``module_local_params=True`` for the test (no global parameter store); a
    module opts in with ``pytestmark = pytest.mark.usefixtures("local_params")``."""
    with pyro.settings.context(module_local_params=True):
        yield


#: A small repetitive text: enough windows for tiny models to train, evaluate and resume on.
TINY_TEXT = "the quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Path of a text file holding :data:`TINY_TEXT`."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TINY_TEXT)
    return path


@pytest.fixture(scope="session")
def tiny_data(tiny_corpus):
    """:class:`~bayes_router.data.tokens.TokenData` of :func:`tiny_corpus` (do not mutate)."""
    from bayes_router.data.tokens import token_data

    return token_data(str(tiny_corpus))
