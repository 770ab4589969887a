"""The gateway in front of a real vLLM CPU server, against calling it directly, a bare relay and
LiteLLM's proxy, with the same client in the same run.

  python -m loadtests.bench_remote [--rounds 8] [--concurrency 8] [--adapters 8] [--no-litellm]

Set-up: vLLM (``.venv-vllm``, ``make vllm``) serves SmolLM2-135M-Instruct in bf16 with LoRA on and
8 random rank-8 adapters on q/k/v/o, as ``tensafe vllm-command`` starts it, pinned to core 0
(``taskset`` and ``VLLM_CPU_OMP_THREADS_BIND=0``). Everything else runs on core 1: ``tensafe
agent`` beside vLLM; the gateway (``tensafe serve``, tenancy on: a tenant, its API key, the 8
adapters uploaded as signed and encrypted TSSP packages, delivered to vLLM by the agent);
``loadtests.relay_floor`` (httpx relaying the stream on uvicorn: the floor); LiteLLM's proxy
(``make litellm``: its own venv, no database) with a model entry per adapter; and this client.

Workload: rounds of ``--concurrency`` concurrent streaming chat completions, request j of a
round on adapter j mod ``--adapters``, each prompt exactly 128 tokens after the chat template
(a unique opening per request and target, so vLLM's prefix cache never serves one target from
another's work), greedy, 64 generated tokens (``ignore_eos``). Each round is sent to every target
in turn, the order rotated round by round, so request (round, j) is a pair across the targets.
TTFT is the time to the first non-empty content delta; throughput is completion tokens (from the
streams' usage) over the rounds' wall time. On one core a round's eight prefills take seconds,
and whether a request arrives before or after vLLM starts a step moves its TTFT by hundreds of
milliseconds, so ``--single`` more requests per target then go one at a time (targets
alternating, 4 tokens each, vLLM idle when each arrives): their TTFT is one prefill, and the
difference is what the target itself adds.

Prints one JSON line: ``{"direct": {...}, "gateway": {...}, "floor": {...}, "litellm": {...},
"added_ms": {target: {"ttft_p50", "ttft_p50_ci95", "ttft_p99", "ttft_p99_ci95",
"one_at_a_time_ttft_p50", "one_at_a_time_ttft_p50_ci95"}}, "throughput_ratio": {target: tok/s /
direct's}, "bars": {...}, "meets_bars": bool, "meets_bars_one_at_a_time": bool}``; the
confidence intervals are bootstrapped over the pairs. Bars: gateway throughput >= 0.95x direct,
gateway added TTFT p50 <= the floor's + 3 ms and < half of LiteLLM's.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from adapters.base_model import BaseModelSpec
from adapters.keys import current_recipient_from_document, generate_signing_key
from adapters.package import pack
from engine.config import DEFAULT_MODEL, default_cache_dir
from engine.model.checkpoint import resolve_checkpoint

from .bench_cache import peft_dir
from .bench_gateway import Connection, free_port, pct
from .vllm_procs import AGENT_TOKEN, ROOT, AgentProcess, VllmServer, wait_http

MODEL = "smollm2-135m-instruct"
ADMIN = "tsk-bench-remote-admin"
LITELLM_KEY = "sk-bench-remote-0123456789abcdef0123456789abcdef"  # its proxy's master key: auth on
PROMPT_TOKENS = 128
NEW_TOKENS = 64
LITELLM_PYTHON = Path(os.environ.get("TENSAFE_LITELLM_PYTHON", ROOT / ".venv-litellm" / "bin" / "python"))
FILLER = ("The harbour master kept a ledger of every ship that came and went, noting its cargo, its crew "
          "and the weather on the day it sailed. ").split()


def prompts(tokenizer, n: int, tag: str) -> list[str]:
    """``n`` user messages, each exactly PROMPT_TOKENS tokens once the chat template wraps it."""
    def length(text: str) -> int:
        templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False)
        return len(tokenizer(templated, add_special_tokens=False)["input_ids"])

    out = []
    for i in range(n):
        words = [f"Entry {tag}-{i}:"]
        while length(text := " ".join(words)) < PROMPT_TOKENS:
            words.append(FILLER[len(words) % len(FILLER)])
        while length(text) > PROMPT_TOKENS:  # a word may be several tokens: trim characters back
            text = text[:-1]
        if length(text) != PROMPT_TOKENS:
            raise RuntimeError(f"cannot make a prompt of exactly {PROMPT_TOKENS} tokens")
        out.append(text)
    return out


def payload(port: int, model: str, content: str, key: str | None, max_tokens: int = NEW_TOKENS) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{auth}"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cpus: str = "1") -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(["taskset", "-c", cpus, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


class Target:
    """One way to reach vLLM: its port, and per adapter index the model name and the key."""

    def __init__(self, name: str, port: int, models: list[str], key: str | None = None) -> None:
        self.name, self.port, self.models, self.key = name, port, models, key
        self.ttft: list[float] = []
        self.single: list[float] = []  # TTFT of requests sent one at a time
        self.tokens = 0
        self.wall_s = 0.0
        self.conns: list[Connection] = []

    async def round(self, contents: list[str], adapters: int, record: bool, max_tokens: int = NEW_TOKENS,
                    first: int = 0) -> list[tuple[float, float, int]]:
        # fresh connections, opened before the clock starts: the servers close idle keep-alive
        # connections (uvicorn after 5 s) while the other targets take their turns
        self.close()
        self.conns = [Connection(self.port) for _ in contents]
        await asyncio.gather(*(c.open() for c in self.conns))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(
            conn.stream(payload(self.port, self.models[(first + j) % adapters], text, self.key, max_tokens))
            for j, (conn, text) in enumerate(zip(self.conns, contents))))
        wall = time.perf_counter() - t0
        if record:
            self.ttft += [r[0] for r in results]
            self.tokens += sum(r[2] for r in results)
            self.wall_s += wall
        return results

    def close(self) -> None:
        for c in self.conns:
            c.close()

    def summary(self) -> dict:
        return {"ttft_p50": round(pct(self.ttft, 50), 2), "ttft_p99": round(pct(self.ttft, 99), 2),
                "tok_per_s": round(self.tokens / self.wall_s, 2), "completion_tokens": self.tokens,
                "requests": len(self.ttft), "one_at_a_time_ttft_p50": round(pct(self.single, 50), 2)}


def bootstrap(ours: list[float], base: list[float], q: float, resamples: int = 2000) -> list[float]:
    """95% interval of pct(ours, q) - pct(base, q), resampling the pairs."""
    rng = random.Random(0)
    n = len(ours)
    diffs = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(pct([ours[i] for i in idx], q) - pct([base[i] for i in idx], q))
    diffs.sort()
    return [round(diffs[int(0.025 * resamples)], 2), round(diffs[int(0.975 * resamples) - 1], 2)]


def tenant_setup(url: str, adapter_dirs: list[Path]) -> tuple[str, list[str]]:
    """A tenant, its key and signing key, and the adapters uploaded as TSSP packages."""
    admin = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, timeout=60) as http:
        http.post("/admin/tenants", json={"id": "bench"}, headers=admin).raise_for_status()
        key = http.post("/admin/tenants/bench/keys", json={"scopes": ["tenant", "tenant-admin"]},
                        headers=admin).json()["key"]
        auth = {"authorization": f"Bearer {key}"}
        signer = generate_signing_key()
        pems = {k: v.decode() for k, v in signer.public_key().to_pems().items()}
        http.post("/v1/signing-keys", json=pems, headers=auth).raise_for_status()
        recipient = current_recipient_from_document(http.get("/v1/tssp/recipient").json())
        names = []
        for i, src in enumerate(adapter_dirs):
            name = f"bench-{i}"
            data = pack(src, tenant="bench", name=name, version="1", base_model=MODEL, signer=signer,
                        recipient=recipient)
            r = http.post("/v1/adapters", content=data, headers={**auth, "content-type": "application/octet-stream"})
            if r.status_code != 201:
                raise RuntimeError(f"upload of {name}: {r.status_code} {r.text}")
            names.append(name)
    return key, names


def internal_ids(gateway_url: str, key: str, names: list[str], agent: AgentProcess) -> list[str]:
    """The id vLLM knows each adapter by: one request per adapter through the gateway, and what
    the agent registered for it."""
    ids = []
    with agent.client() as c, httpx.Client(base_url=gateway_url, timeout=300,
                                           headers={"authorization": f"Bearer {key}"}) as http:
        for name in names:
            before = {a["adapter_id"] for a in c.get("/v1/adapters").json()["adapters"]}
            r = http.post("/v1/chat/completions", json={"model": name, "max_tokens": 1,
                                                        "messages": [{"role": "user", "content": "hi"}]})
            r.raise_for_status()
            (new,) = {a["adapter_id"] for a in c.get("/v1/adapters").json()["adapters"]} - before
            ids.append(new)
    return ids


def litellm_config(path: Path, vllm_url: str, ids: list[str]) -> Path:
    lines = ["model_list:"]
    for i, internal in enumerate(ids):
        lines += [f"  - model_name: bench-{i}", "    litellm_params:", f"      model: hosted_vllm/{internal}",
                  f"      api_base: {vllm_url}/v1", "      api_key: none"]
    lines += ["litellm_settings:", "  telemetry: false", "  drop_params: false",
              "general_settings:", f"  master_key: {LITELLM_KEY}"]
    path.write_text("\n".join(lines) + "\n")
    return path


async def measure(targets: list[Target], tokenizer, args: argparse.Namespace) -> None:
    try:
        for t in targets:  # warm-up: every adapter used once through every target
            await t.round(prompts(tokenizer, args.concurrency, f"warm-{t.name}"), args.adapters, record=False)
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for t in order:
                contents = prompts(tokenizer, args.concurrency, f"{rnd}-{t.name}")
                gc.collect()
                await t.round(contents, args.adapters, record=True)
        # one request at a time, targets alternating: vLLM idle when each arrives, so its TTFT is
        # one 128-token prefill and what a target adds shows without the batch's step boundaries
        for i in range(args.single):
            for t in targets:
                (text,) = prompts(tokenizer, 1, f"single-{i}-{t.name}")
                (result,) = await t.round([text], args.adapters, record=False, max_tokens=4, first=i)
                t.single.append(result[0])
    finally:
        for t in targets:
            t.close()


def main_async(args: argparse.Namespace) -> dict:
    os.sched_setaffinity(0, {1})  # the client on core 1, with the gateway and the peers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped on the way out
    checkpoint = resolve_checkpoint(DEFAULT_MODEL, default_cache_dir())
    spec = BaseModelSpec.from_hf_config(DEFAULT_MODEL, json.loads((checkpoint / "config.json").read_text()))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    work = Path(tempfile.mkdtemp(prefix="tensafe-bench-remote-"))
    shm = Path(tempfile.mkdtemp(prefix="tensafe-bench-agent-", dir="/dev/shm"))
    procs: list[subprocess.Popen] = []
    vllm = agent = None
    targets: list[Target] = []
    try:
        dirs = [peft_dir(work / f"a{i}", spec, 8, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=i)
                for i in range(args.adapters)]
        options = {"max_loras": args.adapters, "max_cpu_loras": args.adapters, "max_lora_rank": 8,
                   "max_num_seqs": args.concurrency, "max_model_len": 1024, "dtype": "bfloat16"}
        vllm = VllmServer(work, checkpoint, options, cpus="0")
        print("starting vLLM on core 0...", file=sys.stderr)
        vllm.start()
        agent = AgentProcess(work, shm, vllm.url, max_adapters=2 * args.adapters, max_bytes=1 << 30)
        agent.start()
        gw_port = free_port()
        pools = [{"name": "default", "kind": "vllm", "urls": [vllm.url], "token": AGENT_TOKEN,
                  "options": {"agent_url": agent.url}}]
        gw = spawn([sys.executable, "-m", "gateway.cli", "serve", "--port", str(gw_port), "--data-dir",
                    str(work / "data"), "--admin-key", ADMIN, "--pools", json.dumps(pools), "--vllm",
                    json.dumps(options), "--log-level", "warning", "--max-queue", "256"], work / "gateway.log")
        procs.append(gw)
        wait_http(f"http://127.0.0.1:{gw_port}/ready", gw, 180, work / "gateway.log")
        key, names = tenant_setup(f"http://127.0.0.1:{gw_port}", dirs)
        ids = internal_ids(f"http://127.0.0.1:{gw_port}", key, names, agent)

        floor_port = free_port()
        floor = spawn([sys.executable, "-m", "uvicorn", "loadtests.relay_floor:app", "--port", str(floor_port),
                       "--log-level", "warning", "--no-access-log"], work / "floor.log",
                      {"TENSAFE_RELAY_UPSTREAM": vllm.url, "TENSAFE_RELAY_POOL": str(args.concurrency)})
        procs.append(floor)
        wait_port(floor_port, floor, work / "floor.log")
        targets = [Target("direct", vllm.port, ids), Target("gateway", gw_port, names, key),
                   Target("floor", floor_port, ids)]
        if args.litellm:
            if not LITELLM_PYTHON.is_file():
                raise SystemExit(f"LiteLLM's venv is missing ({LITELLM_PYTHON}): run `make litellm`, or pass "
                                 "--no-litellm")
            ll_port = free_port()
            config = litellm_config(work / "litellm.yaml", vllm.url, ids)
            ll = spawn([str(LITELLM_PYTHON), "-m", "litellm.proxy.proxy_cli", "--config", str(config), "--host",
                        "127.0.0.1", "--port", str(ll_port), "--num_workers", "1"], work / "litellm.log",
                       {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
                        "LITELLM_LOG": "ERROR"})
            procs.append(ll)
            wait_http(f"http://127.0.0.1:{ll_port}/health/liveliness", ll, 180, work / "litellm.log")
            targets.append(Target("litellm", ll_port, names, LITELLM_KEY))
        print(f"measuring {args.rounds} rounds x {len(targets)} targets...", file=sys.stderr)
        asyncio.run(measure(targets, tokenizer, args))
    finally:
        for proc in procs:
            stop(proc)
        if agent is not None:
            agent.kill()
        if vllm is not None:
            vllm.kill()
        shutil.rmtree(shm, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    direct = targets[0]
    out: dict = {"bench": "remote_vllm", "rounds": args.rounds, "concurrency": args.concurrency,
                 "adapters": args.adapters, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    out.update({t.name: t.summary() for t in targets})
    out["added_ms"] = {t.name: {
        "ttft_p50": round(pct(t.ttft, 50) - pct(direct.ttft, 50), 2), "ttft_p50_ci95": bootstrap(t.ttft, direct.ttft, 50),
        "ttft_p99": round(pct(t.ttft, 99) - pct(direct.ttft, 99), 2), "ttft_p99_ci95": bootstrap(t.ttft, direct.ttft, 99),
        "one_at_a_time_ttft_p50": round(pct(t.single, 50) - pct(direct.single, 50), 2),
        "one_at_a_time_ttft_p50_ci95": bootstrap(t.single, direct.single, 50),
    } for t in targets[1:]}
    out["throughput_ratio"] = {t.name: round(out[t.name]["tok_per_s"] / out["direct"]["tok_per_s"], 3)
                               for t in targets[1:]}
    out["bars"] = {"throughput_ratio": 0.95, "ttft_p50_over_floor_ms": 3.0, "of_litellm": 0.5}
    throughput = out["throughput_ratio"]["gateway"] >= 0.95
    out["meets_bars"] = throughput and meets(out["added_ms"], "ttft_p50")
    out["meets_bars_one_at_a_time"] = throughput and meets(out["added_ms"], "one_at_a_time_ttft_p50")
    return out


def meets(added: dict, figure: str) -> bool:
    ours = added["gateway"][figure]
    met = ours <= added["floor"][figure] + 3.0
    if "litellm" in added:
        met = met and ours < 0.5 * added["litellm"][figure]
    return met


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not open in {timeout_s} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="rounds per target (64 requests at concurrency 8)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--single", type=int, default=96, help="requests per target sent one at a time (4 tokens each)")
    ap.add_argument("--no-litellm", dest="litellm", action="store_false", help="leave LiteLLM's proxy out")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    print(json.dumps(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
