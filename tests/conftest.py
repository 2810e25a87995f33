"""Shared fixtures: healthy models are built once per session (calibration costs seconds)."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from tests import nets


@pytest.fixture(scope="session")
def _healthy_cnn() -> nn.Module:
    return nets.healthy_cnn()


@pytest.fixture(scope="session")
def _healthy_mlp() -> nn.Module:
    return nets.healthy_mlp()


@pytest.fixture
def healthy_cnn(_healthy_cnn: nn.Module) -> nn.Module:
    """A fresh copy each test, so a test that changes it cannot leak into another."""
    return copy.deepcopy(_healthy_cnn)


@pytest.fixture
def healthy_mlp(_healthy_mlp: nn.Module) -> nn.Module:
    return copy.deepcopy(_healthy_mlp)


@pytest.fixture
def healthy_cnn_pristine(_healthy_cnn: nn.Module) -> nn.Module:
    """A second fresh copy, for tests that plant a defect in `healthy_cnn`."""
    return copy.deepcopy(_healthy_cnn)
