"""The gateway over a pool of kind vllm: a real vLLM CPU server and a real ``tensafe agent``,
the official openai client against a real uvicorn. Greedy outputs equal vLLM's own; vLLM killed
mid-stream ends that stream with an error event and the next request goes elsewhere; after
vLLM restarts, the agent registers its adapters again and the gateway uses it again."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from gateway.app import create_app
from loadtests.vllm_procs import AGENT_TOKEN, AgentProcess

from .conftest import API_KEY, BASE, VLLM_OPTIONS, Server, settings

pytestmark = pytest.mark.slow
ADMIN = "tsk-admin-vllm-pool"
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def pool_agent(tmp_path_factory, vllm_server):
    shm = Path(tempfile.mkdtemp(prefix="tensafe-test-", dir="/dev/shm"))
    proc = AgentProcess(tmp_path_factory.mktemp("pool-agent"), shm, vllm_server.url, max_adapters=4)
    proc.start()
    yield proc
    with proc.client() as c:
        for a in c.get("/v1/adapters").json()["adapters"]:
            c.post("/v1/leases", json={"holder": "x", "ttl_s": 0, "adapters": [a["adapter_id"]]})
    proc.kill()
    shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, vllm_server, pool_agent, adapter_dirs):
    tmp = tmp_path_factory.mktemp("gw-vllm")
    pools = [{"name": "default", "kind": "vllm", "urls": [vllm_server.url], "token": AGENT_TOKEN,
              "options": {"agent_url": pool_agent.url}},
             {"name": "spare", "kind": "null"}]
    s = settings(tmp, pools=json.dumps(pools), vllm=json.dumps(VLLM_OPTIONS), admin_key=ADMIN,
                 adapters=f"support={adapter_dirs['support']}", health_interval_s=0.2, breaker_cooldown_s=0.5,
                 max_num_seqs=4)
    with Server(create_app(s)) as server:
        yield server


def admin(server: Server, path: str) -> httpx.Response:
    return httpx.post(server.url + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def backends(server: Server) -> dict[str, dict]:
    r = httpx.get(server.url + "/admin/backends", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    return {b["id"]: b for b in r.json()["data"]}


def chats(caplog, at_least: int) -> list[dict]:
    """The access-log records of chat completions, once there are ``at_least`` of them."""
    def found() -> list[dict]:
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == "tensafe.access"
                and '"path":"/v1/chat/completions"' in r.getMessage()]
    wait_until(lambda: len(found()) >= at_least, timeout_s=10)
    return found()


def only_vllm(server: Server) -> None:
    assert admin(server, "/admin/backends/spare/spare-0/drain").status_code == 200
    wait_until(lambda: backends(server)["spare-0"]["drained"])


def test_greedy_outputs_through_the_gateway_equal_vllms_own(gateway, vllm_server, pool_agent):
    only_vllm(gateway)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0) as client:
        ours = client.chat.completions.create(model="support", messages=CHAT, max_tokens=16, temperature=0)
        base = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=16, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="support", messages=CHAT, max_tokens=16, temperature=0, stream=True) if c.choices)
        tokens = httpx.post(gateway.url + "/tokenize", json={"model": "support", "prompt": "Hello there"},
                            headers={"authorization": f"Bearer {API_KEY}"}).json()
    with pool_agent.client() as c:
        (internal,) = [a["adapter_id"] for a in c.get("/v1/adapters").json()["adapters"]]
    assert internal != "support"  # vLLM knows our internal id, never the name a caller used

    def direct(model: str) -> dict:
        return httpx.post(vllm_server.url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": CHAT, "max_tokens": 16, "temperature": 0}).json()

    reference = direct(internal)
    assert ours.choices[0].message.content == reference["choices"][0]["message"]["content"] == streamed
    assert ours.usage.completion_tokens == reference["usage"]["completion_tokens"]
    assert ours.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert base.choices[0].message.content == direct(BASE)["choices"][0]["message"]["content"]
    assert base.choices[0].message.content != ours.choices[0].message.content  # the adapter did something
    assert tokens["tokens"] == httpx.post(vllm_server.url + "/tokenize", json={"model": BASE,
                                                                               "prompt": "Hello there"}).json()["tokens"]
    assert tokens["max_model_len"] == VLLM_OPTIONS["max_model_len"]


def test_vllm_killed_mid_stream_and_restarted(gateway, vllm_server, pool_agent, caplog):
    caplog.set_level(logging.INFO, logger="tensafe.access")
    only_vllm(gateway)
    body = {"model": "support", "messages": CHAT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        vllm_server.kill()
            last = json.loads(events[-1][6:])
        assert last["error"]["code"] == "backend_unavailable"
        assert admin(gateway, "/admin/backends/spare/spare-0/undrain").status_code == 200
        wait_until(lambda: not backends(gateway)["spare-0"]["drained"])
        after = http.post("/v1/chat/completions", json={"model": "support", "messages": CHAT, "max_tokens": 4})
        assert after.status_code == 200  # on the spare backend: failed over, or dispatched there at once
        served = chats(caplog, 2)
        assert served[-1]["backend"] == "spare-0" and served[-1]["status"] == 200
        assert served[-2]["status"] == 503 and served[-2]["error_code"] == "backend_unavailable"

        vllm_server.start()  # the agent, still running, registers its adapters in the new vLLM again
        wait_until(lambda: backends(gateway)["vllm"]["up"], timeout_s=60)
        wait_until(lambda: len(vllm_server.registered()) == 1, timeout_s=30)
        only_vllm(gateway)
        again = http.post("/v1/chat/completions", json={"model": "support", "messages": CHAT, "max_tokens": 16,
                                                        "temperature": 0})
        assert again.status_code == 200, again.text
        assert chats(caplog, 3)[-1]["backend"] == "vllm"
    admin(gateway, "/admin/backends/spare/spare-0/undrain")
