import os

import pytest

os.environ.setdefault("SELFEVOLVE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
# one cache (converted .gguf models) for this process and the CLI subprocesses (which get HOME=/tmp)
os.environ.setdefault("SELFEVOLVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "selfevolve"))


@pytest.fixture(scope="session")
def tiny():
    """The bundled tiny model as an HFPolicy, loaded once per test session."""
    import torch

    from selfevolve.policies import HFPolicy

    torch.set_num_threads(2)
    return HFPolicy("tiny", device="cpu")
