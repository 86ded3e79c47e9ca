"""Shared fixtures: tiny reference sets for the exact oracle backbone."""

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use small tensors: extra intra-op threads only spin on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def references() -> torch.Tensor:
    """(4, 1, 8, 8) reference images in [0, 1], well separated."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, 8, 8, generator=g)


@pytest.fixture
def rgb_references() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 8, 8, generator=g)


@pytest.fixture
def formats_dir() -> Path:
    path = SHARED / "formats"
    if not path.is_dir():
        pytest.skip(f"checkpoint manifests not found at {path} (../shared beside the repo)")
    return path
