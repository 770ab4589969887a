"""The standard generation workload (../shared/baselines/workload.json), located and loaded once
for every benchmark that replays it."""
from __future__ import annotations

import json
import os
from pathlib import Path

_CANDIDATES = (
    os.environ.get("TENSAFE_WORKLOAD", ""),
    str(Path(__file__).resolve().parents[2] / "shared" / "baselines" / "workload.json"),
    str(Path(__file__).resolve().parent / "workload.json"),
)


def load_workload() -> dict:
    for candidate in _CANDIDATES:
        if candidate and Path(candidate).is_file():
            return json.loads(Path(candidate).read_text())
    raise SystemExit("workload.json not found: set TENSAFE_WORKLOAD to shared/baselines/workload.json")


def default_prepared() -> Path:
    root = os.environ.get("TENSAFE_BASELINES") or str(Path.home() / ".cache" / "tensafe-baselines")
    return Path(root) / "prepared"
