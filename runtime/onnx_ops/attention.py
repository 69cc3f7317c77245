"""Attention: the opset-23/24 Attention op, com.microsoft MultiHeadAttention / Attention /
GroupQueryAttention, and the rotary embeddings.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_ops.registry import op, scalar, torch_dtype


def _repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
            softcap: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over [B, H, S, D]; a row masked everywhere gives zeros."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    if not softcap:
        if bias is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if bias.dtype == torch.bool:
            bias = torch.where(bias, 0.0, float("-inf")).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return torch.where(torch.isneginf(bias).all(-1, keepdim=True), 0.0, out) if bias.is_floating_point() else out
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + (torch.where(bias, 0.0, float("-inf")) if bias.dtype == torch.bool else bias)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(torch.nan_to_num(p, nan=0.0), v)


def _causal_bias(q_len: int, kv_len: int, offset: int | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    i = torch.arange(q_len, device=device).view(-1, 1)
    j = torch.arange(kv_len, device=device).view(1, -1)
    return torch.where(j <= i + offset, 0.0, float("-inf")).to(dtype)


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    b, s, h = t.shape
    return t.reshape(b, s, n, h // n).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, h * d)


@op("Attention")
def _attention(ctx, x, a):
    q, k, v = (ctx.t(t) for t in x[:3])
    mask = ctx.t(x[3]) if len(x) > 3 else None
    past_k = ctx.t(x[4]) if len(x) > 4 else None
    past_v = ctx.t(x[5]) if len(x) > 5 else None
    nonpad = ctx.t(x[6]) if len(x) > 6 else None  # opset 24: valid keys per batch row, padding after them
    if nonpad is not None and past_k is not None:
        raise UnsupportedError("Attention with both nonpad_kv_seqlen and past_key, which the ONNX spec forbids")
    if a.get("left_window_size", -1) >= 0 or a.get("right_window_size", -1) >= 0:
        raise UnsupportedError("Attention with left_window_size / right_window_size (opset-25 sliding windows) is not "
                               "supported; ONNX Runtime 1.31 does not run it either")
    if a.get("qk_matmul_output_mode", 0) and ctx.n_outputs > 3:
        raise UnsupportedError("Attention with a qk_matmul_output output is not supported")
    three_d = q.dim() == 3
    if three_d:
        q = _heads(q, a["q_num_heads"])
        k = _heads(k, a["kv_num_heads"])
        v = _heads(v, a["kv_num_heads"])
    if past_k is not None:
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
    present_k, present_v = k, v
    scale = a.get("scale", 1.0 / math.sqrt(q.shape[-1]))
    q_len, kv_len = q.shape[2], k.shape[2]
    bias = mask
    if bias is not None and bias.shape[-1] < kv_len:
        pad = kv_len - bias.shape[-1]
        bias = F.pad(bias, (0, pad), value=False if bias.dtype == torch.bool else float("-inf"))
    extra = []
    if nonpad is not None:
        keys = torch.arange(kv_len, device=q.device).view(1, 1, 1, -1)
        extra.append(torch.where(keys < nonpad.view(-1, 1, 1, 1), 0.0, float("-inf")).to(q.dtype))
    if a.get("is_causal", 0):
        # Bottom-right aligned: query i sees keys j <= i + offset, offset = the keys before the query block
        # (the past, or per row nonpad_kv_seqlen - q_len for an external cache; 0 without either).
        offset: Any = past_k.shape[2] if past_k is not None else 0
        if nonpad is not None:
            offset = nonpad.view(-1, 1, 1, 1) - q_len
        extra.append(_causal_bias(q_len, kv_len, offset, q.dtype, q.device))
    for e in extra:
        if bias is None:
            bias = e
        else:
            bias = (torch.where(bias, 0.0, float("-inf")).to(q.dtype) if bias.dtype == torch.bool else bias) + e
    softmax_dtype = torch_dtype(a["softmax_precision"]) if a.get("softmax_precision") else q.dtype
    if softmax_dtype != q.dtype:
        out = _attend(q.to(softmax_dtype), k.to(softmax_dtype), v.to(softmax_dtype),
                      bias.to(softmax_dtype) if bias is not None and bias.is_floating_point() else bias,
                      scale, a.get("softcap", 0.0)).to(q.dtype)
    else:
        out = _attend(q, k, v, bias, scale, a.get("softcap", 0.0))
    if three_d:
        out = _merge_heads(out)
    return out, present_k, present_v


@op("MultiHeadAttention", domain="com.microsoft")
def _ms_multi_head_attention(ctx, x, a):
    get = lambda i: ctx.t(x[i]) if len(x) > i and x[i] is not None else None  # noqa: E731
    q, k, v, bias, kpm, rel, past_k, past_v = (get(i) for i in range(8))
    n = a["num_heads"]
    if k is None or v is None or k.dim() != 3 or q.dim() != 3:
        raise UnsupportedError("com.microsoft.MultiHeadAttention with packed QKV/KV inputs is not supported")
    if bias is not None:
        d = q.shape[-1]
        q, k, v = q + bias[:d], k + bias[d : 2 * d], v + bias[2 * d :]
    q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
    if past_k is not None:
        k, v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    attn_bias = _ms_key_padding_bias("MultiHeadAttention", kpm, q, k.shape[2], a.get("mask_filter_value", -10000.0),
                                     end_start=False)
    if rel is not None:
        attn_bias = rel if attn_bias is None else attn_bias + rel
    if a.get("unidirectional", 0):
        c = _causal_bias(q.shape[2], k.shape[2], k.shape[2] - q.shape[2], q.dtype, q.device)
        attn_bias = c if attn_bias is None else attn_bias + c
    out = _merge_heads(_attend(q, k, v, attn_bias, scale))
    return out, k, v


def _ms_key_padding_bias(op_name: str, mask: torch.Tensor | None, q: torch.Tensor, kv_len: int, filter_value: float,
                         *, end_start: bool) -> torch.Tensor | None:
    """com.microsoft masks as an additive bias: kept keys 0, masked ones mask_filter_value (not -inf, as ONNX
    Runtime does, so a row masked everywhere is uniform). Raw masks (2-D [B, kv], 3-D [B, q, kv]) hold 1 to
    keep and 0 to mask; 1-D ones are positions (``_ms_mask_index_keep``). ``end_start``: the op also defines
    the [2*B] end-and-start form (Attention's mask_index; MultiHeadAttention's key_padding_mask does not)."""
    if mask is None:
        return None
    if mask.dim() == 1:
        m = _ms_mask_index_keep(op_name, mask, q.shape[0], kv_len, end_start=end_start)
    elif mask.dim() == 2:  # [B, kv]
        m = mask.view(mask.shape[0], 1, 1, mask.shape[1])
    elif mask.dim() == 3:  # [B, q, kv]
        m = mask.unsqueeze(1)
    else:
        raise UnsupportedError(
            f"com.microsoft.{op_name}: a {mask.dim()}-D mask of shape {list(mask.shape)} is not supported (the 4-D "
            "Megatron form, which ONNX Runtime's CPU kernel refuses too); lora_fx runs 1-D mask indices and 2-D / 3-D "
            "raw masks. Way out: optimize the model with a raw 2-D attention mask (onnxruntime.transformers "
            "FusionOptions.use_raw_attention_mask(True), or --use_raw_attention_mask)")
    return torch.where(m.to(torch.bool), 0.0, filter_value).to(q.dtype)


def _ms_mask_index_keep(op_name: str, index: torch.Tensor, batch: int, kv_len: int, *, end_start: bool) -> torch.Tensor:
    """A 1-D com.microsoft mask index as a [B, 1, 1, kv] keep mask. [B]: each row's end position (its key
    length; keys from it on are padding, right padding). [2*B]: end positions, then start positions (keys
    before the start are padding too, left padding). Per ONNX Runtime's ContribOperators.md; its CPU kernel
    clips an end past kv to kv, as the comparison here does."""
    n = index.shape[0]
    keys = torch.arange(kv_len, device=index.device).view(1, 1, 1, -1)
    if n == batch:
        return keys < index.view(-1, 1, 1, 1)
    if n == 2 * batch and end_start:
        end, start = index[:batch].view(-1, 1, 1, 1), index[batch:].view(-1, 1, 1, 1)
        return (keys < end) & (keys >= start)
    forms = "[batch] (key lengths)" + (" and [2*batch] (end then start positions)" if end_start else "")
    packed = ""
    if n == 3 * batch + 2:
        packed = " (likely the [3*batch+2] form: key lengths with cumulative query/key offsets, read by ONNX Runtime's CUDA kernels)"
    raise UnsupportedError(
        f"com.microsoft.{op_name}: a 1-D mask of length {n} for a batch of {batch}{packed} is not supported; "
        f"lora_fx runs the 1-D forms {forms}, and 2-D / 3-D raw masks. Way out: optimize the model with a raw 2-D "
        "attention mask (onnxruntime.transformers FusionOptions.use_raw_attention_mask(True), or --use_raw_attention_mask)")


@op("Attention", domain="com.microsoft")
def _ms_attention(ctx, x, a):
    get = lambda i: ctx.t(x[i]) if len(x) > i and x[i] is not None else None  # noqa: E731
    inp, w, bias, mask, past, rel = (get(i) for i in range(6))
    if past is not None or a.get("past_present_share_buffer", 0):
        raise UnsupportedError("com.microsoft.Attention with past state is not supported")
    n = a["num_heads"]
    sizes = a.get("qkv_hidden_sizes") or [w.shape[1] // 3] * 3
    qkv = torch.matmul(inp, w)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = torch.split(qkv, sizes, dim=-1)
    q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    attn_bias = _ms_key_padding_bias("Attention", mask, q, k.shape[2], a.get("mask_filter_value", -10000.0),
                                     end_start=True)
    if rel is not None:
        attn_bias = rel if attn_bias is None else attn_bias + rel
    if a.get("unidirectional", 0):
        c = _causal_bias(q.shape[2], k.shape[2], 0, q.dtype, q.device)
        attn_bias = c if attn_bias is None else attn_bias + c
    return _merge_heads(_attend(q, k, v, attn_bias, scale))


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, dim: int) -> torch.Tensor:
    """Rotary embedding on [B, S, H, D] with cos/sin [B or 1, S, 1, dim/2]."""
    rot, rest = t[..., :dim], t[..., dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot.chunk(2, dim=-1)
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rot = torch.stack((real, imag), dim=-1).reshape(rot.shape)
    else:
        rot = torch.cat((real, imag), dim=-1)
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


@op("RotaryEmbedding")
def _rotary_embedding(ctx, x, a):
    t, cos, sin = ctx.t(x[0]), ctx.t(x[1]), ctx.t(x[2])
    pos = ctx.t(x[3]) if len(x) > 3 and x[3] is not None else None
    shape = t.shape
    heads = a.get("num_heads", 0)  # needed for 3-D input only; 4-D carries its heads
    h = t.transpose(1, 2) if t.dim() == 4 else t.reshape(shape[0], shape[1], heads, -1)
    dim = a.get("rotary_embedding_dim", 0) or h.shape[-1]
    if pos is not None:
        cos, sin = cos[pos], sin[pos]
    out = _rotate(h, cos.unsqueeze(2), sin.unsqueeze(2), bool(a.get("interleaved", 0)), dim)
    return out.transpose(1, 2) if t.dim() == 4 else out.reshape(shape)


@op("RotaryEmbedding", domain="com.microsoft")
def _ms_rotary_embedding(ctx, x, a):
    t, pos, cos, sin = ctx.t(x[0]), ctx.t(x[1]), ctx.t(x[2]), ctx.t(x[3])
    shape = t.shape
    n = a.get("num_heads", 0)  # needed for 3-D input only; 4-D carries its heads
    if t.dim() == 4:  # [B, H, S, D]
        h = t.transpose(1, 2)
    else:
        n = n or shape[-1] // (cos.shape[-1] * 2)
        h = t.reshape(shape[0], shape[1], n, -1)
    s = h.shape[1]
    if pos.numel() == 1:
        cos, sin = cos[int(scalar(x[1])) : int(scalar(x[1])) + s].unsqueeze(0), sin[int(scalar(x[1])) : int(scalar(x[1])) + s].unsqueeze(0)
    else:
        cos, sin = cos[pos], sin[pos]
    dim = a.get("rotary_embedding_dim", 0) or cos.shape[-1] * 2
    out = _rotate(h, cos.unsqueeze(2), sin.unsqueeze(2), bool(a.get("interleaved", 0)), dim)
    return out.transpose(1, 2) if t.dim() == 4 else out.reshape(shape)


@op("GroupQueryAttention", domain="com.microsoft")
def _ms_group_query_attention(ctx, x, a):
    get = lambda i: ctx.t(x[i]) if len(x) > i and x[i] is not None else None  # noqa: E731
    q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin = (get(i) for i in range(9))
    n, kv_n = a["num_heads"], a["kv_num_heads"]
    if a.get("smooth_softmax", -1) == 1:  # ONNX Runtime turns it on at 1 only (0 and -1 are off)
        raise UnsupportedError("com.microsoft.GroupQueryAttention with smooth_softmax=1 is not supported")
    if k is None:  # packed QKV
        d = q.shape[-1] // (n + 2 * kv_n)
        q, k, v = torch.split(q, [n * d, kv_n * d, kv_n * d], dim=-1)
    q, k, v = _heads(q, n), _heads(k, kv_n), _heads(v, kv_n)
    b, _, s, d = q.shape
    past_len = past_k.shape[2] if past_k is not None else 0
    if past_len and s != 1:
        raise UnsupportedError("com.microsoft.GroupQueryAttention with a past state and a multi-token query is not supported")
    total = int(scalar(x[6])) if x[6] is not None else past_len + s
    if a.get("do_rotary", 0):
        # each sequence's positions start after its own past
        lengths = seqlens_k.to(torch.int64).view(-1) + 1
        start = (lengths - s).clamp(min=0) if past_len else torch.zeros_like(lengths)
        pos = start.view(-1, 1) + torch.arange(s, device=q.device).view(1, -1)
        inter = bool(a.get("rotary_interleaved", 0))
        dim = cos.shape[-1] * 2
        q = _rotate(q.transpose(1, 2), cos[pos].unsqueeze(2), sin[pos].unsqueeze(2), inter, dim).transpose(1, 2)
        k = _rotate(k.transpose(1, 2), cos[pos].unsqueeze(2), sin[pos].unsqueeze(2), inter, dim).transpose(1, 2)
    if past_k is not None:
        k, v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
    kv_len = k.shape[2]
    lengths = seqlens_k.to(torch.int64).view(-1, 1, 1, 1) + 1  # valid keys per sequence
    j = torch.arange(kv_len, device=q.device).view(1, 1, 1, -1)
    i = torch.arange(s, device=q.device).view(1, 1, -1, 1)
    if past_len:  # decoding: the new tokens sit at the end of each sequence's valid keys
        allowed = (j < lengths) & (j <= i + (lengths - s))
    else:  # prompt: plain causal from the first token (right padding only affects padded rows)
        allowed = (j <= i) & (j < lengths)
    if a.get("local_window_size", -1) > 0:
        allowed = allowed & (j > i + (lengths - s) - a["local_window_size"])
    bias = torch.where(allowed, 0.0, float("-inf")).to(q.dtype)
    scale = a.get("scale") or 1.0 / math.sqrt(d)
    out = _attend(q, k, v, bias, scale, a.get("softcap", 0.0))
    del total
    return _merge_heads(out), k, v
