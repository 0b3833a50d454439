import os

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile("llmfn", deadline=None, max_examples=15, derandomize=True)
settings.load_profile("llmfn")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~100x slower on two threads of a busy machine (OpenMP waits): modules of
    tiny-model tests use it (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
