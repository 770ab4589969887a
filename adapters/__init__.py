"""TSSP: signed, encrypted LoRA adapter packages (format in ``SPEC.md``).

Pure library: no web framework, no engine. Modules, leaves first:

- ``errors``      the exception hierarchy (``InvalidPackage`` is opaque by design)
- ``limits``      ``Limits``: bounds applied before anything is allocated
- ``keypairs`` / ``keyfiles`` / ``keys``   hybrid keys, key directories, the public key API
- ``signatures``  Ed25519 + ML-DSA-65, both required
- ``hybrid_kem``  X25519 + ML-KEM-768 data-key wrapping
- ``format``      the byte layout; ``manifest`` the signed JSON; ``payload`` the safetensors body
- ``lora``        ``LoraConfig``: an adapter's rank, alpha and target modules
- ``base_model``, ``peft``, ``validate``   reading PEFT output and checking it against a model
- ``package``     ``pack``, ``open_package``, ``inspect``;  ``cli`` the command-line verbs
"""
from .errors import (
    AdaptersError,
    BaseModelConfigError,
    InvalidAdapter,
    InvalidPackage,
    KeyFileError,
)
from .limits import Limits
from .lora import LoraConfig

__all__ = ["AdaptersError", "BaseModelConfigError", "InvalidAdapter", "InvalidPackage",
           "KeyFileError", "Limits", "LoraConfig"]
