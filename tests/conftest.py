"""Shared test set-up: CPU only, offline, deterministic, quiet."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The scikit-image photographs written as PNG folders (train/ and holdout/)."""
    from bir.data.samples import materialize_samples

    root = tmp_path_factory.mktemp("samples")
    materialize_samples(root)
    return root
