"""The first requests after a fresh start: ``tensafe serve --dev`` on a new data directory (the
demo tenant is made at start), then, once ``/ready`` answers, ten chat requests one after
another on the demo adapter and ten with ``model: "auto"``, each timed to its last byte.

  python -m loadtests.bench_first_request [--backend embedded] [--tokens 16]

Prints one JSON line: ``{"ready_s", "chat_ms": [10 figures], "auto_ms": [...], "first_over_tenth":
{"chat", "auto"}}``. Bar: the first request within 2x the tenth and under 2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .loadtest import ROOT, free_port, wait_ready


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="embedded")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="tensafe-first-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--dev", "--backend", args.backend,
                             "--port", str(port), "--data-dir", str(data), "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        wait_ready(url, proc)
        ready_s = time.perf_counter() - t0
        key = (data / "demo-api-key").read_text().strip()
        timings: dict[str, list[float]] = {"chat": [], "auto": []}
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=120) as http:
            for kind, model, prompt in (("chat", "demo-support", "Where is my order?"),
                                        ("auto", "auto", "I forgot my password")):
                for _ in range(10):
                    start = time.perf_counter()
                    r = http.post("/v1/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": args.tokens, "temperature": 0})
                    r.raise_for_status()
                    timings[kind].append(round((time.perf_counter() - start) * 1000, 1))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(data, ignore_errors=True)
    ratios = {k: round(v[0] / v[9], 2) for k, v in timings.items()}
    print(json.dumps({"bench": "first_request", "backend": args.backend, "ready_s": round(ready_s, 2),
                      "chat_ms": timings["chat"], "auto_ms": timings["auto"], "first_over_tenth": ratios,
                      "meets_bars": all(r <= 2 and v[0] < 2000 for r, v in zip(ratios.values(), timings.values()))}))


if __name__ == "__main__":
    main()
