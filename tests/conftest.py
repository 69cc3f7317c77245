"""Shared, session-scoped fixtures: each real model is built and captured once per test session.

``zoo.gm(name)`` hands out a deep copy of the captured GraphModule, so a test may rewrite it freely
(apply, load_adapter, set_training_mode) without affecting other tests.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests import models


class Zoo:
    def __init__(self) -> None:
        self._models: dict[str, torch.nn.Module] = {}
        self._captured: dict[str, torch.fx.GraphModule] = {}

    def model(self, name: str) -> torch.nn.Module:
        """The eager model (shared: do not modify it; deep-copy first)."""
        if name not in self._models:
            self._models[name] = models.build(name)
        return self._models[name]

    def gm(self, name: str) -> torch.fx.GraphModule:
        """A fresh copy of the captured, unrewritten GraphModule."""
        if name not in self._captured:
            import lora_fx

            self._captured[name] = lora_fx.capture(self.model(name), kwargs=models.inputs(2, 8))
        return copy.deepcopy(self._captured[name])


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()
