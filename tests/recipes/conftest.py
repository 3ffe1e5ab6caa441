import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Recipe tests run tiny models: one torch thread is fastest, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
