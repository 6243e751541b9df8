"""Shared setup for the ``rankwise.linalg`` tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # The matrices here are small: one thread avoids OpenMP/MKL wake-ups that make a small QR
    # hundreds of times slower on a busy 2-core machine. Restored for the next module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
