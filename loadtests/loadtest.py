"""``make loadtest``: a bounded headless locust run against a local ``tensafe serve``, then its
report: the CSV files, locust's HTML report and a PNG chart of TTFT and ITL over the run.

  python -m loadtests.loadtest [--backend embedded|null] [--out .loadtest] [-- LOCUST ARGS]

The gateway is started on a free port with its own data directory and operator key under
``--out``; the locust arguments default to ``-u 50 -r 10 -t 60s``.
"""
from __future__ import annotations

import argparse
import csv
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from .bench_gateway import free_port
from .vllm_procs import ROOT, wait_http


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300, log: Path | None = None) -> None:
    wait_http(url + "/ready", proc, timeout_s, log)


def chart(history: Path, png: Path) -> None:
    """TTFT and ITL (median and 95th percentile, as locust's history has them) over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[float], list[float], list[float]]] = {}
    with history.open() as f:
        for row in csv.DictReader(f):
            if row["Type"] in ("TTFT", "ITL") and row["50%"] not in ("N/A", ""):
                t, p50, p95 = series.setdefault(row["Type"], ([], [], []))
                t.append(float(row["Timestamp"]))
                p50.append(float(row["50%"]))
                p95.append(float(row["95%"]))
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, kind in zip(axes, ("TTFT", "ITL")):
        t, p50, p95 = series.get(kind, ([], [], []))
        start = t[0] if t else 0.0
        ax.plot([x - start for x in t], p50, label="p50")
        ax.plot([x - start for x in t], p95, label="p95")
        ax.set_ylabel(f"{kind} (ms)")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds into the run")
    fig.suptitle("streams: time to first token and inter-token latency (running percentiles)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    argv = sys.argv[1:]
    locust_args = argv[argv.index("--") + 1:] if "--" in argv else ["-u", "50", "-r", "10", "-t", "60s"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="embedded")
    ap.add_argument("--out", default=".loadtest")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    admin = f"tsk-{secrets.token_hex(16)}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (out / "gateway.log").open("w") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--backend", args.backend, "--port",
                                    str(port), "--data-dir", str(out / "data"), "--log-level", "warning"],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TENSAFE_ADMIN_KEY": admin})
    try:
        wait_ready(url, gateway, log=out / "gateway.log")
        run = subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
                              "--host", url, "--headless", "--csv", str(out / "run"), "--csv-full-history",
                              "--html", str(out / "run.html"), "--only-summary", *locust_args],
                             cwd=ROOT, env={**os.environ, "TENSAFE_ADMIN_KEY": admin, "PYTHONPATH": str(ROOT)})
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
    chart(out / "run_stats_history.csv", out / "run.png")
    print(f"report: {out}/run.html, {out}/run_stats.csv, {out}/run.png")
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
