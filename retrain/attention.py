"""Attention for padding-free / packed rows: ``VARLEN_ATTENTION``, an sdpa that gives each sequence of a row its
own causal call instead of a ``T x T`` block mask, switched on for a model by ``use_varlen_attention``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "loraloop_sdpa_varlen"
_BOUNDS: list[Any] = [None, None]  # (the tensor the sequence bounds were read from, the bounds)


def _sequence_bounds(query: Any, key: Any, attention_mask: Any, is_causal: bool, kwargs: Mapping[str, Any]) -> Any:
    """Where each sequence of a padding-free row starts and ends (``[0, s1, ..., T]``), or None when the row is not
    several sequences laid end to end (a padded batch, one sequence, decoding with a cache)."""
    import torch

    length = query.shape[2]
    if attention_mask is not None or not is_causal or query.shape[0] != 1 or key.shape[2] != length:
        return None
    cu = kwargs.get("cu_seq_lens_q")  # TRL's padding-free collator computes them
    source = cu if cu is not None else kwargs.get("position_ids")
    if source is None:
        return None
    if _BOUNDS[0] is source:  # every layer of a forward gets the same tensor: one device-to-host copy
        bounds = _BOUNDS[1]
    elif cu is not None:
        bounds = [int(x) for x in cu.tolist()]
    elif source.shape[-1] == length:
        pos = source.reshape(-1, length)[0]  # a new sequence wherever the position does not go up by one
        starts = (torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist()
        bounds = [0, *starts, length]
    else:
        return None
    _BOUNDS[:] = [source, bounds]
    if len(bounds) <= 2 or bounds[0] != 0 or bounds[-1] != length:
        return None
    return bounds


def varlen_sdpa_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
    scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any,
) -> tuple[Any, None]:  # fmt: skip
    """SDPA that keeps the sequences of a padding-free / packed row apart without a ``T x T`` mask.

    transformers' sdpa builds a block-diagonal ``T x T`` mask from packed ``position_ids`` (correct, but quadratic
    in the whole row: a packed batch of 16 x 512 tokens is an 8192 x 8192 mask). Here each sequence (bounds from
    TRL's ``cu_seq_lens_q``, else from the ``position_ids`` restarts) gets its own causal SDPA call, like a
    flash-attention varlen kernel. Anything else (padded batches with a mask, decoding) is plain sdpa."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    bounds = _sequence_bounds(query, key, attention_mask, bool(causal), kwargs)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split, not slices: the backward of a split is one concatenation, while each slice's backward would build a
    # gradient of the whole row (quadratic in the number of sequences)
    lengths = [b - a for a, b in pairwise(bounds)]
    parts = [
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """The mask for ``VARLEN_ATTENTION``: sdpa's for padded batches; none for padding-free rows (the attention
    splits them by sequence), so no ``T x T`` mask is built."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def use_varlen_attention(model: Any) -> bool:
    """Switch an sdpa model to ``VARLEN_ATTENTION`` (for padding-free / packed batches). False when the model
    keeps its attention: not sdpa (flash attention already handles packed rows; eager is left alone), sliding
    windows (the per-sequence calls would ignore them), or no attention interface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config.get_text_config()
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sliding_window", None):
        return False
    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    try:
        model.set_attn_implementation(VARLEN_ATTENTION)
    except (ValueError, AttributeError) as exc:
        log.warning("cannot switch to the varlen attention (%s); packed rows use sdpa with a block mask", exc)
        return False
    return getattr(model.config.get_text_config(), "_attn_implementation", None) == VARLEN_ATTENTION


__all__ = ["VARLEN_ATTENTION", "use_varlen_attention", "varlen_sdpa_attention"]
