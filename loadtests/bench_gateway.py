"""Gateway overhead: the same streaming workload on the null backend, called in-process and
through the HTTP gateway (a real uvicorn process on 127.0.0.1).

  python -m loadtests.bench_gateway [--requests 64] [--tokens 16] [--token-delay-ms 5] [--rounds 10] [--adapter]

Each round starts ``--requests`` concurrent streaming chat completions of ``--tokens`` tokens.
The HTTP client is a minimal asyncio HTTP/1.1 reader (no SDK parsing cost in the figure) that
keeps one persistent connection per concurrent stream, as an SDK's connection pool does, so
the difference between the two sides is what the gateway adds: auth, JSON parsing and
validation, SSE framing, HTTP and the access log. ``added_ms_one_at_a_time`` repeats the
comparison with one request in flight, the per-request cost without queueing.

The peer, measured with the same client in the same run (rounds alternate between the two
servers): ``loadtests.asgi_floor``, a bare ASGI app on uvicorn that only reads the body,
parses the JSON and streams the same chunks at the same pace. ``floor_added_ms`` is what
HTTP, uvicorn and a second process add on this machine before any gateway logic.

Prints one JSON line: ``{"added_ms": {"ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99"},
"floor_added_ms": {...}, "direct": {...}, "gateway": {...}, "floor": {...}}``.
Bars: added TTFT p50 <= 1 ms, added end-to-end p99 <= 5 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.backends import BackendRequest, LoraConfig, Message, Sampling
from gateway.backends.null import NullBackend

MODEL = "smollm2-135m-instruct"
KEY = "bench-key"
DEMO_ADAPTER = "demo-support"
CONTENT = re.compile(rb'"content":\s*"[^"]')  # a delta with text (not a role chunk's empty one)
USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(ttft: list[float], e2e: list[float]) -> dict[str, float]:
    return {"ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99)}


async def direct_round(backend: NullBackend, n: int, tokens: int, rnd: int,
                       adapter_id: str | None = None) -> tuple[list[float], list[float]]:
    async def one(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        first = None
        req = BackendRequest(f"r{rnd}-{i}", Sampling(max_tokens=tokens, temperature=0),
                             messages=(Message("user", "Tell me about the sea."),), adapter_id=adapter_id)
        async for chunk in backend.generate(req):
            if first is None and chunk.completion_tokens:  # past the acceptance: the first token
                first = time.perf_counter()
        return (first - t0) * 1000, (time.perf_counter() - t0) * 1000

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return [r[0] for r in results], [r[1] for r in results]


def request_bytes(port: int, tokens: int, model: str = MODEL, key: str = KEY) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                       "max_tokens": tokens, "temperature": 0, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection:
    """One persistent HTTP/1.1 connection, as an SDK client keeps in its pool."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def stream(self, payload: bytes) -> tuple[float, float, int]:
        """One streaming request: (ms to the first non-empty content, ms to the end, completion
        tokens: the usage chunk's when the stream has one, else the content chunks counted)."""
        if self.writer is None:
            await self.open()
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        t0 = time.perf_counter()
        writer.write(payload)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        first = None
        chunks = 0
        tail = b""
        while True:  # chunked transfer encoding
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readexactly(2)
                break
            data = await reader.readexactly(size + 2)
            tail = tail[-512:] + data
            found = len(CONTENT.findall(data))
            if found:
                chunks += found
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        if first is None:
            raise RuntimeError(f"a stream without content: {tail[-300:]!r}")
        usage = USAGE.findall(tail)
        return (first - t0) * 1000, (end - t0) * 1000, int(usage[-1]) if usage else chunks


async def http_round(conns: list[Connection], payload: bytes) -> tuple[list[float], list[float]]:
    results = await asyncio.gather(*(c.stream(payload) for c in conns))
    return [r[0] for r in results], [r[1] for r in results]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not start")


def start_gateway(args: argparse.Namespace, data_dir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--backend", "null", "--port", str(port), "--api-key", KEY,
           "--null-tokens", str(args.tokens), "--null-token-delay-s", str(args.token_delay_ms / 1000),
           "--max-num-seqs", str(args.requests), "--log-level", args.log_level, "--data-dir", data_dir]
    if args.adapter:
        cmd.append("--dev")
    return start_server(cmd, port), port


def start_floor(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    """The peer: a bare ASGI app on uvicorn with the gateway's server settings (loadtests.asgi_floor)."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "loadtests.asgi_floor:app", "--port", str(port), "--log-level",
           "warning", "--no-access-log"]
    env = {**os.environ, "TENSAFE_FLOOR_DELAY_S": str(args.token_delay_ms / 1000)}
    return start_server(cmd, port, env), port


async def measure(servers: dict[str, tuple[int, bytes]],
                  args: argparse.Namespace) -> dict[str, tuple[list[float], list[float]]]:
    """Rounds of concurrent streams against each server (port, request), alternating servers
    round by round so that both meet the same machine conditions."""
    conns = {name: [Connection(port) for _ in range(args.requests)] for name, (port, _) in servers.items()}
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in servers}
    try:
        for name, (_, payload) in servers.items():
            await http_round(conns[name], payload)  # warm-up: opens the connections
        for _ in range(args.rounds):
            for name, (_, payload) in servers.items():
                t, e = await http_round(conns[name], payload)
                out[name][0].extend(t)
                out[name][1].extend(e)
    finally:
        for cs in conns.values():
            for c in cs:
                c.close()
    return out


async def main_async(args: argparse.Namespace) -> dict:
    # The client is the measuring instrument: no collector pauses in it (it collects between phases).
    gc.collect()
    gc.disable()
    backend = NullBackend(model=MODEL, tokens=args.tokens, token_delay_s=args.token_delay_ms / 1000,
                          max_num_seqs=args.requests)
    await backend.start()
    adapter_id = None
    if args.adapter:
        adapter_id = "bench-adapter"
        await backend.load_adapter(adapter_id, {}, LoraConfig(4, 8.0, ("q_proj", "v_proj")))
    d_ttft: list[float] = []
    d_e2e: list[float] = []
    await direct_round(backend, args.requests, args.tokens, -1, adapter_id)  # warm-up
    for rnd in range(args.rounds):
        t, e = await direct_round(backend, args.requests, args.tokens, rnd, adapter_id)
        d_ttft += t
        d_e2e += e
    data_dir = tempfile.TemporaryDirectory(prefix="tensafe-bench-")
    procs = []
    try:
        gw_proc, gw_port = start_gateway(args, data_dir.name)
        procs.append(gw_proc)
        floor_proc, floor_port = start_floor(args)
        procs.append(floor_proc)
        if args.adapter:  # the demo tenant's key and adapter (development mode)
            gw_payload = request_bytes(gw_port, args.tokens, DEMO_ADAPTER,
                                       (Path(data_dir.name) / "demo-api-key").read_text().strip())
        else:
            gw_payload = request_bytes(gw_port, args.tokens)
        servers = {"gateway": (gw_port, gw_payload), "floor": (floor_port, request_bytes(floor_port, args.tokens))}
        gc.collect()
        results = await measure(servers, args)
        gc.collect()
        single = await single_requests(backend, servers, args.tokens, 50, adapter_id)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
        data_dir.cleanup()
    direct = summary(d_ttft, d_e2e)
    gateway, floor = summary(*results["gateway"]), summary(*results["floor"])
    added = {k: round(gateway[k] - direct[k], 3) for k in direct}
    return {
        "bench": "gateway_overhead", "requests": args.requests, "tokens": args.tokens,
        "model": DEMO_ADAPTER if args.adapter else MODEL,
        "token_delay_ms": args.token_delay_ms, "rounds": args.rounds, "added_ms": added,
        "floor_added_ms": {k: round(floor[k] - direct[k], 3) for k in direct},
        "added_ms_one_at_a_time": single["gateway"], "floor_added_ms_one_at_a_time": single["floor"],
        "direct": {k: round(v, 3) for k, v in direct.items()}, "gateway": {k: round(v, 3) for k, v in gateway.items()},
        "floor": {k: round(v, 3) for k, v in floor.items()},
        "bars": {"ttft_p50": 1.0, "e2e_p99": 5.0},
        "meets_bars": added["ttft_p50"] <= 1.0 and added["e2e_p99"] <= 5.0,
    }


async def single_requests(backend: NullBackend, servers: dict[str, tuple[int, bytes]], tokens: int, n: int,
                          adapter_id: str | None) -> dict[str, dict[str, float]]:
    """One request at a time, alternating direct and each server: the per-request cost without
    queueing behind a burst (added ms per server)."""
    conns = {name: Connection(port) for name, (port, _) in servers.items()}
    direct: tuple[list[float], list[float]] = ([], [])
    served: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in servers}
    try:
        for i in range(n):
            t, e = await direct_round(backend, 1, tokens, 1000 + i, adapter_id)
            direct[0].extend(t)
            direct[1].extend(e)
            for name, conn in conns.items():
                t, e = await http_round([conn], servers[name][1])
                served[name][0].extend(t)
                served[name][1].extend(e)
    finally:
        for conn in conns.values():
            conn.close()
    base = summary(*direct)
    return {name: {k: round(v - base[k], 3) for k, v in summary(*values).items()} for name, values in served.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--token-delay-ms", type=float, default=5.0, help="null backend's time per token")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--log-level", default="warning", help="the gateway's; info writes the access log")
    ap.add_argument("--adapter", action="store_true",
                    help=f"request a tenant adapter ({DEMO_ADAPTER}, the development demo tenant's) instead of the base "
                         "model: adds route resolution and the cache lease (needs the model prepared for its config)")
    try:
        import uvloop
    except ImportError:
        print(json.dumps(asyncio.run(main_async(ap.parse_args()))))
    else:
        print(json.dumps(uvloop.run(main_async(ap.parse_args()))))


if __name__ == "__main__":
    main()
