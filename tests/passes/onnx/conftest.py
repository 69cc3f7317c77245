"""Session fixtures: the ONNX corpus (see ``tests/onnx_corpus.py``) and the merged decoder (``merged_decoder.py``)."""

from __future__ import annotations

import pytest

from tests.onnx_corpus import Corpus, corpus


@pytest.fixture(scope="session")
def onnx_corpus() -> Corpus:
    return corpus()


@pytest.fixture(scope="session")
def merged_decoder_files(tmp_path_factory):
    """``(decoder_model.onnx, decoder_model_merged.onnx)``, exported once for every module that uses them (two dynamo
    exports, about 15 s)."""
    from tests.passes.onnx import merged_decoder

    return merged_decoder.merged_decoder_files(tmp_path_factory.mktemp("merged_decoder"))
