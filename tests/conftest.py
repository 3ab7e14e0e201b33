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
    from helpers.tiny.assets import build_tiny_assets

    return build_tiny_assets()


@pytest.fixture(scope="session")
def reference_image(tiny_profile):
    import datasets

    return datasets.load_dataset(tiny_profile.dataset, split="train")[0]["image"]


# The tiny pipelines, loaded once per test module that asks for them


@pytest.fixture(scope="module")
def paths(tiny_profile):
    return tiny_profile.base_model, tiny_profile.ip_adapter


@pytest.fixture(scope="module")
def vanilla(paths):
    from helpers.model.pipeline import load_pipeline

    return load_pipeline(*paths, variant="vanilla")


@pytest.fixture(scope="module")
def text_aware(paths):
    from helpers.model.pipeline import load_pipeline

    return load_pipeline(*paths, variant="text_aware")


# Notebook 03's adapters (without training) and the model bank over them


@pytest.fixture(scope="module")
def runs(tiny_profile, tmp_path_factory):
    from _adapters import write_finetuned_adapters

    root = tmp_path_factory.mktemp("runs")
    return root, write_finetuned_adapters(tiny_profile, root)


@pytest.fixture(scope="module")
def bank(tiny_profile, runs):
    from helpers.sample.bank import load_models

    return load_models(tiny_profile, runs[0], device="cpu", verbose=False)


# The tiny profile's data through the whole path, as training gets it


@pytest.fixture(scope="session")
def tiny_data(tiny_profile, tmp_path_factory):
    """The tiny profile's data through the whole path, as training gets it."""
    from helpers.data.features import prepare_for_training

    folder = tmp_path_factory.mktemp("tiny_data")
    prep, cache = prepare_for_training(tiny_profile, folder, progress=False)
    return prep, cache, folder
