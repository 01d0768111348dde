"""Fixtures more than one test file uses."""
import os
import warnings
from pathlib import Path

import pytest
import torch


@pytest.fixture
def seeded_quiet():
    """torch seeded 0, and the RuntimeWarnings shapeprof's drop-ins give (a fallback, an unfused path) silenced:
    for tests that compare a drop-in's outputs with the original's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(0)
        yield


def _paths(data, path=()):
    yield path
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*path, k))
    elif isinstance(data, list) and data:
        yield from _paths(data[0], (*path, 0))


@pytest.fixture
def json_paths():
    """paths(data): every key path into a JSON document; into a list's first item only (the others have the same
    structure). For tests that damage a saved report at every place."""
    return _paths


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where a browser test saves its screenshots: SHAPEPROF_SCREENSHOTS=<folder> keeps them (docs/ has some)."""
    keep = os.environ.get("SHAPEPROF_SCREENSHOTS")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
