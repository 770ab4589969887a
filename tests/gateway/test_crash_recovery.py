"""A real gateway process killed (SIGKILL) in the middle of an upload, at each point where a
file exists without its registry record, leaves nothing behind once it restarts: the temp file
and the orphan blob are removed after the grace period (and kept before it, as another
replica's upload in flight would be), and adapters with a record are untouched."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adapters.keys import current_recipient_from_document, generate_signing_key
from adapters.package import pack
from tests.adapters.builders import SMOLLM2, lora_tensors, peft_config, write_peft_dir

from .conftest import BASE

ADMIN = "tsk-crash-admin"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Gateway:
    """One ``tensafe serve`` process on the null backend over ``data_dir``."""

    def __init__(self, data_dir: Path, log: Path, crash_at: str | None = None, grace_s: float = 3600) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TENSAFE_TEST_CRASH_AT": crash_at or ""}
        self.log = log
        with log.open("ab") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.gateway.crashing_gateway", "serve", "--backend", "null", "--data-dir",
                 str(data_dir), "--port", str(self.port), "--admin-key", ADMIN, "--orphan-grace-s", str(grace_s)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the gateway did not become ready"
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained on


def leftovers(data_dir: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in (data_dir / "blobs").glob(pattern))


def test_uploads_killed_midway_leave_nothing_after_restart(tmp_path):
    data = tmp_path / "data"
    log = tmp_path / "gateway.log"
    admin = {"authorization": f"Bearer {ADMIN}"}
    signer = generate_signing_key()

    def package(url: str, name: str, seed: int) -> bytes:
        recipient = current_recipient_from_document(httpx.get(url + "/v1/tssp/recipient").json())
        src = write_peft_dir(tmp_path / name, peft_config(4, ("q_proj",), alpha=8),
                             lora_tensors(SMOLLM2, 4, ("q_proj",), seed=seed))
        return pack(src, tenant="t", name=name, version="1", base_model=BASE, signer=signer, recipient=recipient)

    def upload(url: str, key: str, data: bytes) -> httpx.Response:
        return httpx.post(url + "/v1/adapters", content=data, timeout=30, headers={
            "authorization": f"Bearer {key}", "content-type": "application/octet-stream"})

    # 1. killed while the package sits in its temp file
    gw = Gateway(data, log, crash_at="temp-written")
    assert httpx.post(gw.url + "/admin/tenants", json={"id": "t"}, headers=admin).status_code == 201
    key = httpx.post(gw.url + "/admin/tenants/t/keys", json={"scopes": ["tenant", "tenant-admin"]},
                     headers=admin).json()["key"]
    pems = {k: v.decode() for k, v in signer.public_key().to_pems().items()}
    assert httpx.post(gw.url + "/v1/signing-keys", json=pems, headers={"authorization": f"Bearer {key}"}
                      ).status_code == 201
    with pytest.raises(httpx.TransportError):
        upload(gw.url, key, package(gw.url, "first", 1))
    assert gw.proc.wait(30) == -signal.SIGKILL
    temp = leftovers(data, ".*.tmp")
    assert len(temp) == 1

    # 2. killed with the blob in place and no registry record yet
    gw = Gateway(data, log, crash_at="blob-placed")
    with pytest.raises(httpx.TransportError):
        upload(gw.url, key, package(gw.url, "second", 2))
    assert gw.proc.wait(30) == -signal.SIGKILL
    orphans = leftovers(data, "*.tssp")
    assert len(orphans) == 1

    # 3. restarted within the grace period: both kept (another replica's upload could own them)
    gw = Gateway(data, log, grace_s=3600)
    assert leftovers(data, ".*.tmp") == temp and leftovers(data, "*.tssp") == orphans
    r = upload(gw.url, key, package(gw.url, "kept", 3))
    assert r.status_code == 201, r.text
    listed = httpx.get(gw.url + "/v1/adapters", headers={"authorization": f"Bearer {key}"}).json()["data"]
    assert [a["id"] for a in listed] == ["kept"]  # the orphan never became an adapter
    gw.stop()
    kept = sorted(set(leftovers(data, "*.tssp")) - set(orphans))
    assert len(kept) == 1

    # 4. restarted past the grace period: the leftovers are gone, the real adapter is not
    gw = Gateway(data, log, grace_s=0)
    try:
        assert leftovers(data, ".*.tmp") == []
        assert leftovers(data, "*.tssp") == kept
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "kept", "messages": [
            {"role": "user", "content": "hi"}]}, headers={"authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        gw.stop()
    text = log.read_text()
    assert "removed 2 file(s) a crash left in the blob store" in text
    assert temp[0] in text and orphans[0] in text
