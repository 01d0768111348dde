"""Fixtures more than one test file uses."""
import warnings

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
