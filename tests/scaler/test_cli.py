"""``tensafe-scaler`` as a process: it serves KEDA's protocol, reads its key from a file and
never logs it, and stops cleanly on SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from scaler import externalscaler_pb2 as pb
from scaler import externalscaler_pb2_grpc as pb_grpc
from tests.scaler.test_grpc import gateway, load, metrics_key, ref


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_scaler_process(tmp_path: Path):
    with gateway(tmp_path, "g") as g:
        key = await metrics_key(g.url)
        key_file = tmp_path / "metrics-key"
        key_file.write_text(key + "\n")
        port = free_port()
        log = tmp_path / "scaler.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "scaler", "--listen", f"127.0.0.1:{port}", "--gateway", g.url,
                                     "--metrics-key-file", str(key_file), "--interval", "0.2", "--log-level", "debug"],
                                    stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 20)
                stub = pb_grpc.ExternalScalerStub(channel)
                spec = await stub.GetMetricSpec(ref())
                assert spec.metricSpecs[0].targetSizeFloat == 2000.0
                codes = await load(g.url, 6)
                assert codes == [200] * 6
                await asyncio.sleep(0.5)
                assert (await stub.IsActive(ref())).result  # it scraped the requests with the key
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(20)
        assert rc == 0
        text = log.read_text()
        assert "scaler listening on" in text and key not in text


def test_scaler_refuses_to_start_without_a_source():
    done = subprocess.run([sys.executable, "-m", "scaler", "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "--gateway" in done.stderr
    started = time.monotonic()
    bad = subprocess.run([sys.executable, "-m", "scaler", "--gateway-dns", "no-port"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode != 0 and "HOST:PORT" in bad.stderr and time.monotonic() - started < 30
