"""tiled_linear: x @ W.T + b and grad @ W from W decoded a tile of rows at a time equal F.linear's."""

from __future__ import annotations

import pytest
import torch

from lora_fx.kernels import tiled_linear as tl


@pytest.mark.parametrize("out_f,in_f,block", [(300, 96, 64), (7, 100, 64), (256, 64, 1), (65, 2048, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_tiles_give_the_linear_of_the_whole_weight(out_f, in_f, block, bias, monkeypatch):
    monkeypatch.setattr(tl, "TILE_VALUES", 4096)  # many tiles, a last one cut short
    g = torch.Generator().manual_seed(out_f)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    x = torch.randn(3, 5, in_f, generator=g)
    seen: list[tuple[int, int]] = []

    def rows(r0, r1):
        seen.append((r0, r1))
        assert (r0 * in_f) % block == 0  # every tile starts on a quantization block
        return w[r0:r1].clone()

    y = tl.tiled_linear(x, rows, out_f, in_f, block, b)
    assert y.shape == (3, 5, out_f)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert seen[0][0] == 0 and seen[-1][1] == out_f and all(a[1] == c[0] for a, c in zip(seen, seen[1:]))
    grad = torch.randn(3, 5, out_f, generator=g)
    gx = tl.tiled_grad_input(grad, rows, out_f, in_f, block)
    torch.testing.assert_close(gx, grad @ w, rtol=1e-4, atol=1e-4)


def test_a_tile_holds_about_tile_values_weights_and_whole_blocks():
    rows = tl.rows_per_tile(5632, 2048, 64)
    assert rows * 2048 <= tl.TILE_VALUES and rows * 2048 * 2 > tl.TILE_VALUES
    assert tl.rows_per_tile(4, 100, 64) == 16  # 16 rows of 100 span whole blocks of 64; never fewer
    assert tl.rows_per_tile(10, 8, 64) == 16
