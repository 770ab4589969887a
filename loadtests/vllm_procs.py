"""A real vLLM CPU server (from ``.venv-vllm``, started with the command ``tensafe vllm-command``
prints) and a real ``tensafe agent`` beside it, as processes the tests and ``bench_remote`` can
kill and restart."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from gateway.backends.vllm_server import vllm_command
from gateway.settings import Settings

from .bench_gateway import free_port

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("TENSAFE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
AGENT_TOKEN = "agent-token-0123456789"


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path | None = None) -> None:
    """Wait until ``url`` answers 200 (RuntimeError, with the end of ``log``, if ``proc`` exits
    or time runs out)."""
    def tail() -> str:
        return log.read_text()[-4000:] if log is not None and log.is_file() else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready in {timeout_s} s:\n{tail()}")


class VllmServer:
    def __init__(self, workdir: Path, checkpoint: Path, options: dict, cpus: str | None = None) -> None:
        """``options``: the ``vllm`` settings section; ``cpus``: the cores it runs on (``taskset``
        and its OpenMP threads), all by default."""
        if not VLLM_PYTHON.is_file():
            raise RuntimeError(f"vLLM's venv is missing ({VLLM_PYTHON}): run `make vllm` (make test does)")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings.load({"vllm": {**options, "port": self.port}}, env={})
        self.cpus = cpus or f"0-{os.cpu_count() - 1}"
        self.command = vllm_command(self.settings, model=str(checkpoint))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 180) -> None:
        cache = self.workdir / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.command.env, "PYTHONPATH": str(ROOT), "VLLM_CACHE_ROOT": str(cache / "vllm"),
               "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "VLLM_RPC_BASE_PATH": str(cache),
               "VLLM_CPU_OMP_THREADS_BIND": self.cpus}
        log = self.workdir / f"vllm-{self.starts}.log"
        argv = ["taskset", "-c", self.cpus, str(VLLM_PYTHON), "-m", "loadtests.vllm_cli", *self.command.argv[1:]]
        with log.open("w") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)
        self.starts += 1
        wait_http(self.url + "/health", self.proc, timeout_s, log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its engine core is a child process
            self.proc.wait(30)
        self.proc = None

    def registered(self) -> dict[str, str]:
        data = httpx.get(self.url + "/v1/models", timeout=10).json()["data"]
        return {m["id"]: m["root"] for m in data if m.get("parent")}


class AgentProcess:
    """``tensafe agent`` as its own process (so it can be killed in the middle of things),
    beside the server at ``server_url`` (``server``: vllm or lorax)."""

    def __init__(self, workdir: Path, agent_dir: Path, server_url: str, *, server: str = "vllm",
                 max_adapters: int = 4, max_bytes: int = 64 << 20) -> None:
        self.workdir = workdir
        self.agent_dir = agent_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TENSAFE_AGENT_TOKENS": AGENT_TOKEN, "TENSAFE_AGENT_DIR": str(agent_dir),
                    "TENSAFE_AGENT_SERVER": server, f"TENSAFE_AGENT_{server.upper()}_URL": server_url,
                    "TENSAFE_AGENT_MAX_ADAPTERS": str(max_adapters),
                    "TENSAFE_AGENT_MAX_BYTES": str(max_bytes), "TENSAFE_PORT": str(self.port)}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 30) -> None:
        log = self.workdir / f"agent-{self.port}-{self.starts}.log"
        with log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "agent"], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        self.starts += 1
        wait_http(self.url + "/health", self.proc, timeout_s, log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {AGENT_TOKEN}"}, timeout=30)

    def clear(self) -> None:
        """Release every lease and delete every adapter it holds."""
        with self.client() as c:
            for a in c.get("/v1/adapters").json()["adapters"]:
                c.post("/v1/leases", json={"holder": "any", "ttl_s": 0, "adapters": [a["adapter_id"]]})
                c.delete(f"/v1/adapters/{a['adapter_id']}", params={"holder": "teardown"})


@contextlib.contextmanager
def agent_beside(workdir: Path, server_url: str, **options) -> Iterator[AgentProcess]:
    """A running agent for the server at ``server_url``, on a fresh directory under /dev/shm;
    killed and its directory removed afterwards."""
    shm = Path(tempfile.mkdtemp(prefix="tensafe-test-", dir="/dev/shm"))
    proc = AgentProcess(workdir, shm, server_url, **options)
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()
        shutil.rmtree(shm, ignore_errors=True)
