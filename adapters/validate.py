"""Structural and base-model checks of LoRA tensors (PEFT naming).

Expected names: ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight``
with ``lora_A`` of shape ``(r, in_features)`` and ``lora_B`` of shape ``(out_features, r)``.
Every target module must be adapted in every layer (in every layer of the base model when one
is given), so the engine never has to guess at holes.

The checks run on ``TensorSpec`` triples (name, shape, dtype name), so a package's signed
manifest can be validated before its payload is even decrypted; ``validate_adapter`` applies
them to real tensors.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from .base_model import MODULE_PARENTS, SUPPORTED_MODULES, BaseModelSpec
from .errors import InvalidAdapter
from .limits import Limits
from .manifest import PAYLOAD_DTYPES, TensorSpec

if TYPE_CHECKING:
    from .lora import LoraConfig

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,4})\.(self_attn|mlp)\.([a-z_]+)"
    r"\.lora_(A|B)\.weight")


def lora_tensor_name(layer: int, module: str, which: str) -> str:
    """PEFT's saved name of one LoRA factor (``which`` is "A" or "B")."""
    parent = MODULE_PARENTS[module]
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{which}.weight"


def expected_shapes(config: LoraConfig, base: BaseModelSpec) -> dict[str, tuple[int, int]]:
    """Every tensor a sound adapter with ``config`` on ``base`` holds, with its shape."""
    out = {}
    for module in config.target_modules:
        in_f, out_f = base.projection_shape(module)
        for layer in range(base.num_hidden_layers):
            out[lora_tensor_name(layer, module, "A")] = (config.rank, in_f)
            out[lora_tensor_name(layer, module, "B")] = (out_f, config.rank)
    return out


def _check_one(spec: TensorSpec, config: LoraConfig, base: BaseModelSpec | None
               ) -> tuple[int, str, str]:
    name, shape, dtype = spec
    match = TENSOR_NAME.fullmatch(name)
    if match is None:
        raise InvalidAdapter(f"unexpected tensor {name!r}: only lora_A/lora_B weights of "
                             "target modules are allowed")
    layer, parent, module, which = int(match[1]), match[2], match[3], match[4]
    if module not in config.target_modules:
        raise InvalidAdapter(f"unexpected tensor {name!r}: module {module!r} is not in "
                             f"target_modules {list(config.target_modules)}")
    if MODULE_PARENTS[module] != parent:
        raise InvalidAdapter(f"unexpected tensor {name!r}: {module} lives in "
                             f"{MODULE_PARENTS[module]}, not {parent}")
    if dtype not in PAYLOAD_DTYPES:
        raise InvalidAdapter(f"tensor {name!r} has dtype {dtype}; allowed: float16, bfloat16, "
                             "float32")
    if len(shape) != 2:
        raise InvalidAdapter(f"tensor {name!r} has {len(shape)} dimensions, expected 2")
    rows, cols = shape
    if base is not None:
        if layer >= base.num_hidden_layers:
            raise InvalidAdapter(f"tensor {name!r}: layer {layer} does not exist; {base.model_id} "
                                 f"has {base.num_hidden_layers} layers")
        in_f, out_f = base.projection_shape(module)
        expected = (config.rank, in_f) if which == "A" else (out_f, config.rank)
    else:
        expected = (config.rank, cols) if which == "A" else (rows, config.rank)
    if (rows, cols) != expected:
        kind = ("lora_A must be r x in_features" if which == "A"
                else "lora_B must be out_features x r")
        raise InvalidAdapter(f"tensor {name!r} has shape {[rows, cols]}, expected "
                             f"{list(expected)} ({kind}, r={config.rank})")
    return layer, module, which


def _check_detailed(specs: list[TensorSpec], config: LoraConfig,
                    base: BaseModelSpec | None) -> None:
    seen: dict[str, set[tuple[int, str]]] = {m: set() for m in config.target_modules}
    for spec in specs:
        layer, module, which = _check_one(spec, config, base)
        seen[module].add((layer, which))
    layers = (set(range(base.num_hidden_layers)) if base is not None
              else {layer for pairs in seen.values() for layer, _ in pairs})
    for module, pairs in seen.items():
        for layer in sorted(layers):
            for which in ("A", "B"):
                if (layer, which) not in pairs:
                    name = lora_tensor_name(layer, module, which)
                    raise InvalidAdapter(f"missing tensor {name!r}: target module {module} "
                                         "must be adapted in every layer")


def validate_specs(config: LoraConfig, specs: Iterable[TensorSpec],
                   base: BaseModelSpec | None = None, limits: Limits = Limits()) -> None:
    """``validate_adapter`` on (name, shape, dtype) triples; raises ``InvalidAdapter``."""
    if config.rank > limits.max_rank:
        raise InvalidAdapter(f"rank {config.rank} exceeds max_rank {limits.max_rank}")
    unknown = [m for m in config.target_modules if m not in MODULE_PARENTS]
    if unknown:
        raise InvalidAdapter(f"target module {unknown[0]!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_MODULES)}")
    specs = list(specs)
    if not specs:
        raise InvalidAdapter("the adapter has no tensors")
    if len(specs) > limits.max_tensors:
        raise InvalidAdapter(f"{len(specs)} tensors exceed max_tensors {limits.max_tensors}")
    total = 0
    for _, shape, dtype in specs:
        count = 1
        for d in shape:
            count *= d
        total += count * ITEMSIZE.get(dtype, 0)
    if total > limits.max_payload_bytes:
        raise InvalidAdapter(f"tensors hold {total} bytes, above max_payload_bytes "
                             f"{limits.max_payload_bytes}")
    if base is not None:  # fast path: one dict comparison when everything is as expected
        actual = {name: shape for name, shape, _ in specs}
        if (len(actual) == len(specs) and actual == expected_shapes(config, base)
                and all(dtype in ITEMSIZE for _, _, dtype in specs)):
            return
    _check_detailed(specs, config, base)
    if base is not None:
        raise InvalidAdapter("the tensor list repeats names")


def validate_adapter(config: LoraConfig, tensors: Mapping[str, torch.Tensor],
                     base: BaseModelSpec | None = None, limits: Limits = Limits()) -> None:
    """Raise ``InvalidAdapter`` naming the first problem; return None if the adapter is sound.

    Without ``base`` only self-consistency is checked (ranks, names, dtypes, completeness).
    """
    specs = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise InvalidAdapter(
                f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in DTYPE_NAMES:
            raise InvalidAdapter(f"tensor {name!r} has dtype {tensor.dtype}; allowed: float16, "
                                 "bfloat16, float32")
        specs.append(TensorSpec(name, tuple(tensor.shape), DTYPE_NAMES[tensor.dtype]))
    validate_specs(config, specs, base, limits)

