"""Layer weights prepacked once for oneDNN's CPU matmuls (bfloat16).

``F.linear`` on a bf16 CPU tensor hands the weight to oneDNN in its plain layout, and oneDNN
reorders it into its blocked layout on every call: for a decode step's few rows that reorder
costs as much as the product. Reordered once at load (``mkldnn._reorder_linear_weight``) and
multiplied with ``mkldnn._linear_pointwise``, the same products run 1.3-2x faster at 1 to 64
rows and no slower at prefill's thousands, with the same kernels and so the same bits. The
packed tensors replace the plain ones (no second copy); only the layer projections are packed
(the tied embedding is also the logits head, which ``torch.mm`` serves faster as it is).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .weights import LlamaWeights

log = logging.getLogger(__name__)

#: the batch size oneDNN picks its blocked layout for: 32 rows was as fast as or faster than
#: the plain layout from 1 to 2,048 rows on every projection shape of the default model
BATCH_HINT = 32
PROJECTIONS = ("qkv", "o", "gate_up", "down")


def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a weight from ``pack_layers``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_layers(weights: LlamaWeights) -> bool:
    """Pack every layer projection in place; False (nothing changed) when this build of torch
    cannot, or when a packed product differs from ``F.linear``'s by a single bit."""
    first = weights.layers[0].qkv
    try:
        probe = torch.randn((5, first.shape[1]), generator=torch.Generator().manual_seed(0)).to(first.dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(first, BATCH_HINT)
        same = torch.equal(packed_linear(probe, packed), F.linear(probe, first))
    except (RuntimeError, NotImplementedError) as exc:
        log.info("layer weights stay unpacked: %s", exc)
        return False
    if not same:
        log.info("layer weights stay unpacked: oneDNN's packed product differs from F.linear's here")
        return False
    for layer in weights.layers:
        for name in PROJECTIONS:
            weight = getattr(layer, name)
            setattr(layer, name, packed if weight is first else torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT))
    return True
