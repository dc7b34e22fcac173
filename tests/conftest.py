import os

import pytest
import torch

# Tests never reach the Hub: Hub code is exercised on local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
