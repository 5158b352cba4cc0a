"""Fixtures shared by the test modules: the golden checkpoint's model and tokenizer, one CPU thread."""

import pytest
import torch

from glm6b import load_model
from glm6b.tokenizer import load_tokenizer

from helpers import GOLDEN


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny models, which run fastest on one thread; on a busy 2-core machine several
    torch threads contend and run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """The golden checkpoint in float32 (one instance per test module)."""
    return load_model(GOLDEN, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GOLDEN)
