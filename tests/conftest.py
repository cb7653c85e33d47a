"""Test-wide setup. Triton's interpreter must be chosen before the first `import triton`, so it is
set here (an explicit TRITON_INTERPRET=0, as on the GPU machine, wins)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is ~100x faster than two busy-waiting OpenMP threads on a shared box."""
    import torch  # here, not at the top: the environment above must be set before anything imports triton

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
