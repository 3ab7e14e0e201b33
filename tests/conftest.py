import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any Hub access fails loudly


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two OpenMP threads that wait
    for each other make every step many times slower. (The real-size test raises it for itself.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_profile():
    from helpers.profile import get_profile

    return get_profile("tiny", announce=False)


@pytest.fixture(scope="session")
def tiny_root(tiny_profile):
    from helpers.tiny import build_tiny_assets

    return build_tiny_assets()


@pytest.fixture(scope="session")
def reference_image(tiny_profile):
    import datasets

    return datasets.load_dataset(tiny_profile.dataset, split="train")[0]["image"]
