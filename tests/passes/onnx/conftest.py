"""The ONNX corpus as a session fixture (see ``tests/onnx_corpus.py``)."""

from __future__ import annotations

import pytest

from tests.onnx_corpus import Corpus, corpus


@pytest.fixture(scope="session")
def onnx_corpus() -> Corpus:
    return corpus()
