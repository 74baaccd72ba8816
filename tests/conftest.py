"""Shared test helpers: the relative-error metric and the location of ../shared."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared beside the checkout (skips where a user's machine has none)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the project's shared test data lives beside the checkout)")
    return SHARED
