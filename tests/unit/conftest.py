"""Unit-tier fixtures."""

from __future__ import annotations

from typing import Iterator

import pytest

# NOTE: every API test module imports the API fixtures by name; the key that `client` sends is needed by all of
# them, so it is offered here once.
from tests.unit.test_api_helpers import admin_key  # noqa: F401


@pytest.fixture(autouse=True)
def _one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models gain nothing from more threads, and OpenMP threads crawl when the CPU is shared."""
    if "torch" not in __import__("sys").modules:  # tests of the torch-free contract never pay for importing it
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
