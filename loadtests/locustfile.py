"""Load test of a running gateway with locust: several tenants, Zipf adapter popularity, streamed
and plain chat and text completions, ``model: "auto"``, a trickle of adapter uploads and
deletions, and a few deliberately bad requests.

  locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 60s \\
      --csv .loadtest/run --csv-full-history --html .loadtest/run.html --admin-key "$(cat .data/admin-api-key)"

(``make loadtest`` runs one against a local ``tensafe serve``.) At the start the run creates its
tenants through the admin API (``--tenants``, each with a key, a signing key, ``--adapters``
random rank-4 adapters uploaded as signed and encrypted TSSP packages, and an expert table for
``auto``); they are deleted at the end. Options: ``--admin-key`` (or ``TENSAFE_ADMIN_KEY``),
``--tenants``, ``--adapters``, ``--zipf`` (the popularity exponent), ``--max-tokens``.

What locust reports, per scenario (tags: chat, stream, completion, auto, churn, bad):
- the requests themselves (``POST``), the stream's total time included;
- ``TTFT``: each stream's time to its first token, ms; ``ITL``: its mean time between tokens, ms;
- ``TPS``: each stream's tokens per second, carried in the response-time column;
- ``QUOTA``: a 429 (a quota was hit), counted apart and not a failure.
Expected answers are successes: the 4xx of a bad request, a 404 for an adapter deleted while
the run was using it, a 429.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field

import httpx
from locust import HttpUser, between, events, tag, task

MODEL = "smollm2-135m-instruct"
#: SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64
LAYERS, HIDDEN, KV = 30, 576, 192
PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a list.",
           "Summarise the plot of Hamlet in two sentences.", "How do I reset my password?",
           "Solve 3x + 5 = 20.", "Give me three tips for sleeping better."]
TABLE_TOPICS = [("code", "Programming and software.", ["python", "function"]),
                ("math", "Arithmetic and algebra.", ["solve", "integral"]),
                ("support", "Account and password help.", ["password", "account"])]


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--admin-key", default=os.environ.get("TENSAFE_ADMIN_KEY", ""), include_in_web_ui=False,
                        help="the gateway's operator key (TENSAFE_ADMIN_KEY)")
    parser.add_argument("--tenants", type=int, default=3, help="tenants the run creates")
    parser.add_argument("--adapters", type=int, default=4, help="adapters per tenant")
    parser.add_argument("--zipf", type=float, default=1.1, help="adapter popularity exponent")
    parser.add_argument("--max-tokens", type=int, default=16)


@dataclass
class Tenant:
    id: str
    key: str
    adapters: list[str]
    weights: list[float]
    churn: list[str] = field(default_factory=list)  # uploaded during the run and not deleted yet
    churned: set[str] = field(default_factory=set)  # every one uploaded during the run
    signer: object = None
    recipient: object = None


class World:
    tenants: list[Tenant] = []
    lock = threading.Lock()
    counter = itertools.count()
    options: object = None


def _adapter(seed: int):
    """A random rank-4 LoRA on q/v (LoraConfig and tensors, as pack takes them)."""
    import torch

    from adapters.lora import LoraConfig

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, out in (("q_proj", HIDDEN), ("v_proj", KV)):
            p = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(4, HIDDEN, generator=g) * 0.01
            tensors[f"{p}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.01
    return LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), tensors


def _package(tenant: Tenant, name: str, seed: int) -> bytes:
    from adapters.package import pack

    return pack(_adapter(seed), tenant=tenant.id, name=name, version="1", base_model=MODEL,
                signer=tenant.signer, recipient=tenant.recipient)


def _upload(http: httpx.Client, tenant: Tenant, name: str, seed: int) -> httpx.Response:
    return http.post("/v1/adapters", content=_package(tenant, name, seed), headers={
        "authorization": f"Bearer {tenant.key}", "content-type": "application/octet-stream"})


@events.test_start.add_listener
def _set_up(environment, **_) -> None:
    from adapters.keys import current_recipient_from_document, generate_signing_key

    o = environment.parsed_options
    World.options = o
    if not o.admin_key:
        raise SystemExit("--admin-key (or TENSAFE_ADMIN_KEY) is needed to create the run's tenants")
    admin = {"authorization": f"Bearer {o.admin_key}"}
    run = os.urandom(3).hex()
    with httpx.Client(base_url=environment.host, timeout=120) as http:
        recipient = current_recipient_from_document(http.get("/v1/tssp/recipient").json())
        for t in range(o.tenants):
            tid = f"load-{run}-{t}"
            http.post("/admin/tenants", json={"id": tid}, headers=admin).raise_for_status()
            key = http.post(f"/admin/tenants/{tid}/keys", json={"scopes": ["tenant", "tenant-admin"]},
                            headers=admin).json()["key"]
            signer = generate_signing_key()
            pems = {k: v.decode() for k, v in signer.public_key().to_pems().items()}
            http.post("/v1/signing-keys", json=pems, headers={"authorization": f"Bearer {key}"}).raise_for_status()
            tenant = Tenant(tid, key, [], [], signer=signer, recipient=recipient)
            for i in range(o.adapters):
                _upload(http, tenant, f"a{i}", 1000 * t + i).raise_for_status()
                tenant.adapters.append(f"a{i}")
            tenant.weights = [1 / (i + 1) ** o.zipf for i in range(o.adapters)]
            experts = [{"name": name, "adapter": tenant.adapters[i % o.adapters], "description": desc,
                        "keywords": [{"pattern": w, "weight": 2.0} for w in words], "examples": []}
                       for i, (name, desc, words) in enumerate(TABLE_TOPICS)]
            experts.append({"name": "general", "adapter": MODEL, "description": "Everything else.",
                            "keywords": [], "examples": []})
            http.put("/v1/experts", json={"default": "general", "experts": experts},
                     headers={"authorization": f"Bearer {key}"}).raise_for_status()
            World.tenants.append(tenant)


@events.test_stop.add_listener
def _tear_down(environment, **_) -> None:
    o = environment.parsed_options
    with httpx.Client(base_url=environment.host, timeout=60) as http:
        for tenant in World.tenants:
            http.delete(f"/admin/tenants/{tenant.id}", headers={"authorization": f"Bearer {o.admin_key}"})
    World.tenants = []


def _report(environment, kind: str, name: str, value: float, length: int = 0) -> None:
    environment.events.request.fire(request_type=kind, name=name, response_time=value, response_length=length,
                                    exception=None, context={})


class TenantUser(HttpUser):
    """One caller of one of the run's tenants."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.tenant = World.tenants[next(World.counter) % len(World.tenants)]
        self.headers = {"authorization": f"Bearer {self.tenant.key}"}
        self.max_tokens = World.options.max_tokens

    def _model(self) -> str:
        if self.tenant.churn and random.random() < 0.05:
            return random.choice(self.tenant.churn)
        return random.choices(self.tenant.adapters, self.tenant.weights)[0]

    def _post(self, path: str, body: dict, name: str, expected: tuple[int, ...] = (200,)) -> None:
        with self.client.post(path, json=body, headers=self.headers, name=name, catch_response=True) as r:
            self._judge(r, body, expected)

    def _judge(self, r, body: dict, expected: tuple[int, ...]) -> bool:
        if r.status_code == 429:
            _report(self.environment, "QUOTA", r.request_meta["name"], r.elapsed.total_seconds() * 1000)
            r.success()
            return False
        if r.status_code == 404 and body.get("model") in self.tenant.churned:
            r.success()  # deleted by the churn task while this user had it
            return False
        if r.status_code not in expected:
            r.failure(f"{r.status_code}: {r.text[:200]}")
            return False
        r.success()
        return True

    def _stream(self, path: str, body: dict, name: str) -> None:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first = last = finish = None
        tokens = 0
        with self.client.post(path, json=body, headers=self.headers, name=name, stream=True,
                              catch_response=True) as r:
            if not self._judge(r, body, (200,)):
                return
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    r.failure(f"error event: {event['error'].get('code')}")
                    return
                choices = event.get("choices") or []
                text = choices and (choices[0].get("delta", {}).get("content") or choices[0].get("text"))
                if text:
                    last = time.perf_counter()
                    first = first or last
                if choices and choices[0].get("finish_reason"):
                    finish = choices[0]["finish_reason"]
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            if finish is None:
                r.failure("a stream that ended without its finish reason")
                return
            if first is None:
                return  # the model ended at once (end of sequence): a valid, empty answer
        _report(self.environment, "TTFT", name, (first - t0) * 1000)
        if tokens > 1:
            _report(self.environment, "ITL", name, (last - first) * 1000 / (tokens - 1))
            _report(self.environment, "TPS", name, tokens / max(last - t0, 1e-6), tokens)

    def _chat(self, model: str) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": self.max_tokens, "temperature": 0.7}

    @tag("chat")
    @task(4)
    def chat(self) -> None:
        self._post("/v1/chat/completions", self._chat(self._model()), "chat")

    @tag("stream")
    @task(4)
    def chat_stream(self) -> None:
        self._stream("/v1/chat/completions", self._chat(self._model()), "chat stream")

    @tag("completion")
    @task(2)
    def completion(self) -> None:
        self._post("/v1/completions", {"model": self._model(), "prompt": random.choice(PROMPTS),
                                       "max_tokens": self.max_tokens}, "completion")

    @tag("completion", "stream")
    @task(1)
    def completion_stream(self) -> None:
        self._stream("/v1/completions", {"model": self._model(), "prompt": random.choice(PROMPTS),
                                         "max_tokens": self.max_tokens}, "completion stream")

    @tag("auto")
    @task(2)
    def auto(self) -> None:
        self._post("/v1/chat/completions", self._chat("auto"), "auto")

    @tag("bad")
    @task(1)
    def bad(self) -> None:
        case = random.randrange(3)
        if case == 0:
            self._post("/v1/chat/completions", {"model": self._model()}, "bad: no messages", (400,))
        elif case == 1:
            self._post("/v1/chat/completions", {**self._chat(self._model()), "temperature": 9}, "bad: temperature",
                       (400,))
        else:
            self._post("/v1/chat/completions", self._chat("no-such-adapter"), "bad: unknown model", (404,))

    @tag("churn")
    @task(1)
    def churn(self) -> None:
        """Now and then: upload a new adapter for this tenant, or delete the oldest uploaded one."""
        if random.random() > 0.1:
            return
        t = self.tenant
        with World.lock:
            name = f"churn-{next(World.counter)}"
        if len(t.churn) >= 2:
            old = t.churn[0]
            with self.client.delete(f"/v1/adapters/{old}", headers=self.headers, name="churn: delete",
                                    catch_response=True) as r:
                if r.status_code in (200, 204, 404):
                    r.success()
                    with World.lock:
                        if old in t.churn:
                            t.churn.remove(old)
                else:
                    r.failure(f"{r.status_code}: {r.text[:200]}")
            return
        data = _package(t, name, random.randrange(1 << 30))
        with self.client.post("/v1/adapters", data=data, name="churn: upload", catch_response=True,
                              headers={**self.headers, "content-type": "application/octet-stream"}) as r:
            if r.status_code == 201:
                r.success()
                with World.lock:
                    t.churn.append(name)
                    t.churned.add(name)
            else:
                r.failure(f"{r.status_code}: {r.text[:200]}")
