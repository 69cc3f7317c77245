"""Exports and captures that several test modules need, made once per test process.

A dynamo export of a tiny model takes 3-10 s on 2 cores and a capture about 1 s; several modules used to make the
same one each. Here each is made on first use into one temporary folder (files) or kept in memory (captures):

- ``user_export(builder, exporter)``: a classifier file as a user exports it (``_export`` of
  tests/lora_fx/test_onnx_modules_to_save.py), for the builders of that module and of test_prefix_modules_to_save;
- ``mha_exports()``: the nn.MultiheadAttention block of tests/lora_fx/test_multihead_attention.py by both exporters;
- ``captured(name, attn)``: ``lora_fx.capture`` of a zoo model (tests/models.py) at ``inputs(2, 8)``, as a fresh deep
  copy each call (tests rewrite what they get; conftest's ``zoo.gm`` hands out the same captures).
- ``captured_from(builder, names)`` / ``captured_with(builder, make_inputs, *args, build_args=...)``: the same for a
  module's own seeded builder, at ``inputs(2, 8)`` or at its own inputs (the encoder-decoders' ``batch``/``t5_inputs``).

Files are never written to by the tests that read them (they ``lora_fx.load`` them and save elsewhere).
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from tests import models

TMP = Path(tempfile.mkdtemp(prefix="lora_fx_shared_exports_"))


@functools.cache
def user_export(builder: Callable[[], torch.nn.Module], exporter: str) -> Path:
    """``builder()`` exported by ``_export(model, path, exporter)`` of test_onnx_modules_to_save, once per process.

    Keyed by the builder function itself: each module's ``_bert`` / ``_llama`` is its own seeded model."""
    from tests.lora_fx.test_onnx_modules_to_save import _export

    path = TMP / f"{builder.__module__}.{builder.__qualname__}-{exporter}.onnx"
    _export(builder(), path, exporter)
    return path


@functools.cache
def mha_exports() -> tuple[torch.nn.Module, dict[str, Path]]:
    """The block (Linear, batch-first nn.MultiheadAttention, Linear; seed 0) and its dynamo and TorchScript files."""
    from tests.lora_fx.test_multihead_attention import _Block
    from tests.lora_fx.test_onnx_multihead_attention import export_block

    torch.manual_seed(0)
    block = _Block().eval()
    out = TMP / "mha"
    out.mkdir()
    return block, export_block(block, out)


@functools.cache
def _capture(name: str, attn: str) -> torch.fx.GraphModule:
    import lora_fx

    model = models.build(name)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return lora_fx.capture(model, kwargs=models.inputs(2, 8))


def captured(name: str, attn: str = "sdpa") -> Any:
    """A fresh copy of the capture of zoo model ``name`` (attention implementation ``attn``) at ``inputs(2, 8)``."""
    return copy.deepcopy(_capture(name, attn))


@functools.cache
def _capture_built(builder: Callable[[], torch.nn.Module], names: tuple[str, ...]) -> torch.fx.GraphModule:
    import lora_fx

    # Random-neutral (see _capture_with): the seeded builder would otherwise reseed the generator under the first test.
    with torch.random.fork_rng(devices=[]):
        return lora_fx.capture(builder(), kwargs={k: v for k, v in models.inputs(2, 8).items() if k in names})


def captured_from(builder: Callable[[], torch.nn.Module], names: tuple[str, ...] = ("input_ids", "attention_mask")) -> Any:
    """A fresh copy of the capture of ``builder()`` (a seeded model) at those of ``inputs(2, 8)`` named ``names``.

    Unlike ``lora_fx.capture(model)``, whose GraphModule holds ``model``'s own parameters, the copy shares nothing
    with a model the test builds beside it; the global random generator is left as it was found."""
    return copy.deepcopy(_capture_built(builder, names))


@functools.cache
def _capture_with(builder: Callable[..., torch.nn.Module], build_args: tuple, make_inputs: Callable[..., dict],
                  input_args: tuple) -> torch.fx.GraphModule:
    import lora_fx

    # The test that asks first must see the random stream the ones after it see (they get the cache, and capture draws
    # nothing): the seeded builder would otherwise reseed the generator under it.
    with torch.random.fork_rng(devices=[]):
        return lora_fx.capture(builder(*build_args), kwargs=make_inputs(*input_args))


def captured_with(builder: Callable[..., torch.nn.Module], make_inputs: Callable[..., dict], *input_args: Any,
                  build_args: tuple = ()) -> Any:
    """A fresh copy of the capture of ``builder(*build_args)`` (a seeded model) at ``make_inputs(*input_args)``.

    For models whose inputs are not ``inputs(2, 8)`` (encoder-decoders); all arguments are hashable (they are the
    cache's key), and, as with ``captured_from``, nothing is shared with a model built beside it and the global random
    generator is left as it was found."""
    return copy.deepcopy(_capture_with(builder, tuple(build_args), make_inputs, tuple(input_args)))
