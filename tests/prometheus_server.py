"""A real Prometheus on a free 127.0.0.1 port, scraping the given targets, for tests (Debian's
``prometheus`` package; ``.ci/run`` installs it)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


class PrometheusServer:
    def __init__(self, targets: list[str], *, bearer: str = "", interval_s: float = 1.0,
                 rule_files: list[Path] | None = None) -> None:
        """``targets``: ``host:port`` of each gateway replica, scraped at ``/metrics`` with
        ``bearer`` (written to a file only Prometheus reads)."""
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            raise RuntimeError("prometheus is not installed (apt-get install -y prometheus)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = tempfile.TemporaryDirectory(prefix="tensafe-prometheus-")
        root = Path(self.dir.name)
        job: dict = {"job_name": "tensafe-gateway", "scrape_interval": f"{round(interval_s * 1000)}ms",
                     "static_configs": [{"targets": targets}]}
        if bearer:
            (root / "key").write_text(bearer)
            (root / "key").chmod(0o600)
            job["authorization"] = {"type": "Bearer", "credentials_file": str(root / "key")}
        config = {"global": {"scrape_interval": f"{round(interval_s * 1000)}ms", "evaluation_interval": f"{round(interval_s * 1000)}ms"},
                  "scrape_configs": [job]}
        if rule_files:
            config["rule_files"] = [str(p) for p in rule_files]
        (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        with (root / "log").open("w") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.dir.cleanup()
                raise RuntimeError(f"prometheus exited: {(root / 'log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def wait_scraped(self, timeout_s: float = 20.0) -> None:
        """Until every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = httpx.get(f"{self.url}/api/v1/targets").json()["data"]["activeTargets"]
            if active and all(t["health"] == "up" for t in active):
                return
            time.sleep(0.2)
        raise RuntimeError(f"targets not scraped: {active}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()
