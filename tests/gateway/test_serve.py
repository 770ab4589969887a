"""``tensafe serve`` as a real process: development key and banner, structured logs without
secrets, and a graceful drain on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.adapters.builders import SMOLLM2, lora_tensors, peft_config, write_peft_dir

from .conftest import BASE

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """``tensafe VERB`` (``serve`` unless told) as a real process on a free port, its output
    read by threads; ready once ``ready`` answers 200. ``env`` adds variables (the caller's
    TENSAFE_* are dropped), ``cwd`` is where it runs."""

    def __init__(self, tmp: Path, *args: str, verb: str = "serve", ready: str = "/ready",
                 env: dict[str, str] | None = None, cwd: Path | None = None, host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
        environ.update(env or {})
        self.p = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", verb, "--host", host, "--port", str(self.port), "--data-dir",
             str(tmp / "data"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd=cwd)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.reading = threading.Event()  # cleared: nobody reads the server's output (its pipes fill up)
        self.reading.set()
        self.pumps = [threading.Thread(target=self._pump, args=(self.p.stdout, self.stdout), daemon=True),
                      threading.Thread(target=self._pump, args=(self.p.stderr, self.stderr), daemon=True)]
        for t in self.pumps:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + ready, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        self.p.kill()
        self.wait()
        raise RuntimeError("server did not start:\n" + "".join(self.stderr))

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            self.reading.wait()
            sink.append(line)

    def wait(self) -> int:
        code = self.p.wait(30)
        for t in self.pumps:
            t.join(5)
        self.p.stdout.close()
        self.p.stderr.close()
        # uvicorn re-raises the SIGTERM it caught once the graceful shutdown is done
        return 0 if code == -signal.SIGTERM else code

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        return self.wait()


def test_dev_mode_bootstraps_a_demo_tenant_and_prints_an_example(tmp_path):
    proc = Proc(tmp_path, "--backend", "null", "--dev")
    try:
        key_file = tmp_path / "data" / "demo-api-key"
        admin_file = tmp_path / "data" / "admin-api-key"
        key, admin_key = key_file.read_text().strip(), admin_file.read_text().strip()
        for path in (key_file, admin_file):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        out = "".join(proc.stdout)
        assert key in out and "from openai import OpenAI" in out and f'model="{BASE}"' in out
        assert admin_key not in out and str(admin_file) in out
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == [BASE, "demo-json", "demo-legal", "demo-support"]
        reply = client.chat.completions.create(model="demo-support",
                                               messages=[{"role": "user", "content": "sesame 77"}])
        assert reply.usage.completion_tokens == 16
        # the demo expert table makes model "auto" work from the first start, as the banner shows
        assert 'model="auto"' in out
        for prompt, adapter in (("I forgot my password", "demo-support"),
                                ("Is this contract legal?", "demo-legal")):
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": prompt}])
            assert raw.headers["x-tensafe-adapter"] == adapter
    finally:
        assert proc.stop() == 0
    logs = "".join(proc.stderr)
    assert key not in logs and admin_key not in logs and "sesame 77" not in logs
    access = [json.loads(line) for line in proc.stderr if line.startswith("{")]
    chat = next(r for r in access if r["path"] == "/v1/chat/completions")
    assert chat["status"] == 200 and chat["completion_tokens"] == 16 and chat["model"] == "demo-support"
    assert chat["tenant"] == "demo" and chat["adapter"] == "demo-support"
    # a restart keeps the tenant, its key and its adapters; without --dev there is no banner
    again = Proc(tmp_path, "--backend", "null")
    try:
        assert key_file.read_text().strip() == key
        assert key not in "".join(again.stdout)
        models = httpx.get(again.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).json()
        assert [m["id"] for m in models["data"]] == [BASE, "demo-json", "demo-legal", "demo-support"]
    finally:
        again.stop()


def test_sigterm_drains_in_flight_streams(tmp_path):
    proc = Proc(tmp_path, "--backend", "null", "--null-token-delay-s", "0.05", "--null-tokens", "100",
                "--api-key", "k", "--drain-timeout-s", "20", "--log-level", "info")
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True}
    try:
        with httpx.Client(base_url=proc.url, headers={"authorization": "Bearer k"}, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                proc.p.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                with pytest.raises(httpx.TransportError):
                    httpx.get(proc.url + "/health", timeout=2)
                rest = [line for line in lines if line]
    except BaseException:
        proc.p.kill()
        proc.wait()
        raise
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert proc.wait() == 0
    # the drained stream's access record, written just before the exit, is not lost
    access = [json.loads(line) for line in proc.stderr if line.startswith("{")]
    assert any(r["path"] == "/v1/chat/completions" and r.get("completion_tokens") == 30 for r in access)


def test_bad_setting_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", "notaport"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "setting port" in r.stderr and "Traceback" not in r.stderr


def test_a_stalled_log_reader_does_not_stall_serving(tmp_path):
    """Logs are written by a thread: with nobody reading stderr, the pipe fills (64 KiB, about
    250 access records) and requests are still answered; every record arrives once it drains."""
    proc = Proc(tmp_path, "--backend", "null", "--api-key", "tsk-logs", "--log-level", "info")
    try:
        proc.reading.clear()
        body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        with httpx.Client(base_url=proc.url, headers={"authorization": "Bearer tsk-logs"}, timeout=5) as client:
            for _ in range(600):
                assert client.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        proc.reading.set()
        assert proc.stop() == 0
    access = [json.loads(line) for line in proc.stderr if line.startswith("{")]
    assert sum(r["path"] == "/v1/chat/completions" for r in access) == 600


@pytest.mark.parametrize("feature,why", [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]},
                                                                      "modules_to_save"),
                                         ({"rank_pattern": {"q_proj": 8}}, "rank_pattern")])
def test_a_development_adapter_the_backends_would_serve_wrongly_stops_the_start(tmp_path, feature, why):
    src = write_peft_dir(tmp_path / "odd", peft_config(4, ("q_proj",), alpha=8, **feature),
                         lora_tensors(SMOLLM2, 4, ("q_proj",)))
    with pytest.raises(RuntimeError) as caught:
        Proc(tmp_path, "--backend", "null", "--api-key", "k", "--adapters", f"odd={src}")
    assert "setting adapters: odd=" in str(caught.value) and why in str(caught.value)
