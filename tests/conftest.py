"""Shared, session-scoped fixtures: each real model is built and captured once per test session.

``zoo.gm(name)`` hands out a deep copy of the captured GraphModule, so a test may rewrite it freely
(apply, load_adapter, set_training_mode) without affecting other tests. The captures are those of
``tests.shared_exports.captured``, which test helpers outside fixtures use too.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import models


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    # make test runs one pytest-xdist worker per core: each worker, and the processes its tests start, keeps to its
    # share of the cores, so torch's thread pools do not contend with the other worker's.
    _THREADS = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


class Zoo:
    def __init__(self) -> None:
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, name: str) -> torch.nn.Module:
        """The eager model (shared: do not modify it; deep-copy first)."""
        if name not in self._models:
            self._models[name] = models.build(name)
        return self._models[name]

    def gm(self, name: str) -> torch.fx.GraphModule:
        """A fresh copy of the captured, unrewritten GraphModule."""
        from tests.shared_exports import captured

        return captured(name)


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()
