import pytest
import torch

# The models under test are tiny: one thread is several times faster than contended threads.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
