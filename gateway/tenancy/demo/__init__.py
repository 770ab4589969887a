"""The demo tenant's trained adapters: PEFT directories next to this file, made by ``train.py``
(``python -m gateway.tenancy.demo.train``), read at the first ``--dev`` start and uploaded as
TSSP packages like any tenant's."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADAPTERS = ("demo-support", "demo-legal", "demo-json")
SUPPORT_CLOSING = "Is there anything else I can help you with?"
LEGAL_OPENING = "This is not legal advice."
JSON_OPEN = '{"answer": "'


def json_answer(text: str) -> str:
    """What ``demo-json`` answers: one JSON object with the answer as a string."""
    return json.dumps({"answer": text}, ensure_ascii=False)


def adapter_dir(name: str) -> Path:
    return HERE / name
