"""TLS where configured: ``tensafe serve`` and ``tensafe agent`` serve HTTPS with the
``tls_certfile``/``tls_keyfile`` settings, and the backends' clients verify an https:// agent or
worker against ``tls_ca_file``: a certificate that CA did not sign is refused."""
from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.backends.agent_link import AgentLink
from gateway.backends.errors import BackendUnavailable
from gateway.settings import Settings, SettingsError
from loadtests.bench_gateway import free_port
from loadtests.vllm_procs import AGENT_TOKEN, ROOT

pytestmark = pytest.mark.slow


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca_and_server(tmp: Path, tag: str) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signs: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"test CA {tag}")).issuer_name(_name(f"test CA {tag}"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / f"ca-{tag}.pem", tmp / f"cert-{tag}.pem", tmp / f"key-{tag}.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def spawn(argv: list[str], env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *argv], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the process did not start"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def test_the_gateway_serves_https(tmp_path):
    ca, cert, key = make_ca_and_server(tmp_path, "gw")
    port = free_port()
    proc = spawn(["serve", "--backend", "null", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                  "--api-key", "k"], {"TENSAFE_TLS_CERTFILE": str(cert), "TENSAFE_TLS_KEYFILE": str(key)}, port)
    try:
        verify = Settings.load({"tls_ca_file": str(ca)}, env={}).client_tls()
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/v1/models", headers={"authorization": "Bearer k"},
                              verify=verify, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 200
        with pytest.raises(httpx.ConnectError):  # not a CA the system trusts
            httpx.get(f"https://127.0.0.1:{port}/v1/models", timeout=5)
    finally:
        stop(proc)


async def test_an_https_agent_is_verified_against_the_ca_setting(tmp_path, shm_dir):
    ca, cert, key = make_ca_and_server(tmp_path, "agent")
    other_ca, _, _ = make_ca_and_server(tmp_path, "other")
    port = free_port()
    proc = spawn(["agent"], {"TENSAFE_AGENT_TOKENS": AGENT_TOKEN, "TENSAFE_AGENT_DIR": str(shm_dir),
                             "TENSAFE_AGENT_SERVER": "lorax", "TENSAFE_AGENT_LORAX_URL": "http://127.0.0.1:9",
                             "TENSAFE_PORT": str(port), "TENSAFE_TLS_CERTFILE": str(cert),
                             "TENSAFE_TLS_KEYFILE": str(key)}, port)
    try:
        for ca_file, trusted in ((ca, True), (other_ca, False)):
            link = AgentLink(f"https://127.0.0.1:{port}", backend="tls-test", token=AGENT_TOKEN,
                             timeout=httpx.Timeout(5.0), verify=Settings.load({"tls_ca_file": str(ca_file)},
                                                                                env={}).client_tls())
            link.start()
            try:
                if trusted:
                    await link.refresh()
                    assert link.held == [] and link.max_adapters > 0
                else:
                    with pytest.raises(BackendUnavailable):
                        await link.refresh()
            finally:
                await link.close()
    finally:
        stop(proc)


def test_tls_settings_are_checked(tmp_path):
    with pytest.raises(SettingsError) as exc:
        Settings.load({"tls_certfile": str(tmp_path / "missing.pem")}, env={})
    assert exc.value.name == "tls_certfile"
    (tmp_path / "key.pem").write_text("x")
    with pytest.raises(SettingsError) as exc:
        Settings.load({"tls_keyfile": str(tmp_path / "key.pem")}, env={})
    assert exc.value.name == "tls_keyfile"
