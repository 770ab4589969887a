"""A short headless locust run (its own process: gevent and pytest do not mix) of
``loadtests/locustfile.py`` against a real ``tensafe serve`` on the null backend: every
scenario runs, nothing fails, and the stream statistics are reported."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loadtests.loadtest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "tsk-locust-admin"
SCENARIOS = {"chat", "chat stream", "completion", "completion stream", "auto", "bad: no messages",
             "bad: temperature", "bad: unknown model", "churn: upload"}
pytestmark = pytest.mark.slow


def test_a_short_locust_run_has_no_failures_and_runs_every_scenario(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--backend", "null", "--port", str(port), "--data-dir",
         str(tmp_path / "data"), "--admin-key", ADMIN, "--null-tokens", "16", "--null-token-delay-s", "0.002",
         "--log-level", "warning"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, gateway, timeout_s=60)
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--host", url,
             "--headless", "-u", "20", "-r", "10", "-t", "20s", "--csv", str(tmp_path / "run"), "--only-summary",
             "--admin-key", ADMIN, "--tenants", "2", "--adapters", "3"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr[-3000:]
        with (tmp_path / "run_stats.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if r["Name"] != "Aggregated"]
        by_name = {(r["Type"], r["Name"]): r for r in rows}
        failures = {k: r["Failure Count"] for k, r in by_name.items() if int(r["Failure Count"])}
        assert not failures, (failures, (tmp_path / "run_failures.csv").read_text())
        ran = {name for (kind, name) in by_name if kind in ("POST", "DELETE")}
        assert SCENARIOS <= ran, SCENARIOS - ran
        for kind in ("TTFT", "ITL", "TPS"):
            assert int(by_name[(kind, "chat stream")]["Request Count"]) > 0
        assert float(by_name[("TTFT", "chat stream")]["Median Response Time"]) > 0
        # the run's tenants are gone afterwards
        listed = httpx.get(url + "/admin/tenants", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
        assert not [t for t in listed if t["id"].startswith("load-")]
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
