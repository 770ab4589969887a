"""``tensafe agent``: the only writer of a vLLM server's adapters, on tmpfs only, against a real
vLLM CPU server (one for the whole run) and as a real process that is killed and restarted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save as save_safetensors

from adapters.lora import LoraConfig
from adapters.peft import peft_config
from gateway.agent.app import Agent, create_agent_app
from gateway.agent.holdings import Holdings, directory_name
from gateway.agent.memfs import filesystem_type, is_memory_backed
from gateway.agent.vllm import VllmAdmin
from loadtests.vllm_procs import AGENT_TOKEN, ROOT, AgentProcess
from tests.adapters.builders import SMOLLM2, lora_tensors

MODULES = ("q_proj", "v_proj")
CONFIG = LoraConfig(rank=4, alpha=8.0, target_modules=MODULES)


def adapter_body(seed: int) -> bytes:
    return save_safetensors(lora_tensors(SMOLLM2, 4, MODULES, seed=seed))


def put(client: httpx.Client, adapter_id: str, seed: int, holder: str = "g1", ttl_s: float = 60) -> httpx.Response:
    return client.put(f"/v1/adapters/{adapter_id}", params={"holder": holder, "ttl_s": ttl_s},
                      content=adapter_body(seed), headers={"x-tensafe-peft-config": json.dumps(peft_config(CONFIG))})


def held(client: httpx.Client) -> set[str]:
    return {a["adapter_id"] for a in client.get("/v1/adapters").json()["adapters"]}


def files(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


# ---- without vLLM ---------------------------------------------------------------------------------
def test_importing_the_agent_imports_no_torch():
    code = ("import sys\nimport gateway.agent.server, gateway.cli.agent\n"
            "from gateway.cli import main\nassert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_the_mount_table_tells_memory_from_disk(tmp_path, shm_dir):
    table = ("25 24 0:23 / /dev/shm rw - tmpfs tmpfs rw\n"
             "30 25 8:1 / /dev/shm/disk rw - ext4 /dev/sda1 rw\n"
             "1 0 8:2 / / rw - ext4 /dev/root rw\n"
             "31 1 0:40 / /mnt/with\\040space rw - ramfs ramfs rw\n")
    assert filesystem_type(Path("/"), table) == "ext4"
    assert is_memory_backed(Path("/dev/shm"), table)
    assert not is_memory_backed(Path("/dev/shm/disk"), table)  # a disk mounted inside a tmpfs
    assert not is_memory_backed(Path("/dev/shmem"), table)  # a prefix is not a parent
    assert is_memory_backed(Path("/mnt/with space"), table)
    assert is_memory_backed(shm_dir) and not is_memory_backed(tmp_path)  # this machine's own table


def test_the_agent_refuses_a_directory_on_disk(tmp_path):
    env = {"TENSAFE_AGENT_TOKENS": AGENT_TOKEN, "TENSAFE_AGENT_DIR": str(tmp_path / "adapters"), "PATH": ""}
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "agent"], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode == 2
    assert "not tmpfs or ramfs" in run.stderr and "agent_dir" in run.stderr
    assert not any((tmp_path / "adapters").iterdir())


async def test_every_call_but_health_needs_a_token(shm_dir):
    holdings = Holdings(shm_dir, VllmAdmin("http://127.0.0.1:9"), max_adapters=2, max_bytes=1 << 20,
                        max_lease_s=60)
    app = create_agent_app(Agent(holdings, 1 << 20), (AGENT_TOKEN, "second-token"), reconcile_s=3600)
    async with app.app.router.lifespan_context(app.app):  # type: ignore[attr-defined]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://agent") as c:
            for method, path in (("GET", "/v1/adapters"), ("PUT", "/v1/adapters/x?holder=a"),
                                 ("DELETE", "/v1/adapters/x"), ("POST", "/v1/leases")):
                for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": AGENT_TOKEN}):
                    r = await c.request(method, path, headers=headers, content=b"x")
                    assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized", (method, path)
            assert (await c.get("/health")).status_code == 503  # no vLLM: not ready, but it answers
            for token in (AGENT_TOKEN, "second-token"):
                r = await c.get("/v1/adapters", headers={"authorization": f"Bearer {token}"})
                assert r.status_code == 200 and r.json()["adapters"] == []
    assert files(shm_dir) == set()


# ---- against a real vLLM ------------------------------------------------------------------------------
@pytest.fixture()
def agent(tmp_path, shm_dir, vllm_server):
    proc = AgentProcess(tmp_path, shm_dir, vllm_server.url, max_adapters=2)
    proc.start()
    yield proc
    if proc.proc is None:
        proc.start()
    with proc.client() as c:
        for adapter_id in held(c):
            c.delete(f"/v1/adapters/{adapter_id}", params={"holder": "teardown"})
    proc.kill()
    for name in vllm_server.registered():  # whatever a test registered behind the agent's back
        httpx.post(vllm_server.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)


@pytest.mark.slow
def test_an_adapter_lives_exactly_as_long_as_vllm_has_it(agent, vllm_server, shm_dir):
    with agent.client() as c:
        r = put(c, "tenant-a/support:1", seed=1)
        assert r.status_code == 201 and r.json()["adapter_id"] == "tenant-a/support:1"
        directory = shm_dir / directory_name("tenant-a/support:1")
        assert vllm_server.registered() == {"tenant-a/support:1": str(directory)}
        assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                               "name"]
        completion = httpx.post(vllm_server.url + "/v1/completions", timeout=60, json={
            "model": "tenant-a/support:1", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 4
        assert put(c, "tenant-a/support:1", seed=1, holder="g2").status_code == 200  # held already: leased
        refused = c.delete("/v1/adapters/tenant-a/support:1", params={"holder": "g2"})
        assert refused.status_code == 409 and refused.json()["error"]["reason"] == "in_use"  # g1's lease runs
        c.post("/v1/leases", json={"holder": "g1", "ttl_s": 0, "adapters": ["tenant-a/support:1"]})
        assert c.delete("/v1/adapters/tenant-a/support:1", params={"holder": "g2"}).status_code == 200
        assert vllm_server.registered() == {} and files(shm_dir) == set()
        assert c.delete("/v1/adapters/tenant-a/support:1").status_code == 404


@pytest.mark.slow
def test_room_is_made_from_the_least_recently_used_unleased_adapter(agent, vllm_server, shm_dir):
    with agent.client() as c:
        assert put(c, "a", 1, ttl_s=0).status_code == 201
        assert put(c, "b", 2, ttl_s=0).status_code == 201
        c.post("/v1/leases", json={"holder": "g1", "ttl_s": 0, "adapters": ["a"]})  # touch a: b is now the oldest
        assert put(c, "c", 3, ttl_s=60).status_code == 201
        assert set(vllm_server.registered()) == {"a", "c"} == held(c)
        assert files(shm_dir) == {directory_name("a"), directory_name("c")}
        renewed = c.post("/v1/leases", json={"holder": "g2", "ttl_s": 60, "adapters": ["a", "b"]}).json()
        assert renewed["renewed"] == ["a"] and renewed["missing"] == ["b"]
        full = put(c, "d", 4)
        assert full.status_code == 409 and full.json()["error"]["reason"] == "slots_full"  # a and c leased
        assert set(vllm_server.registered()) == {"a", "c"} and len(files(shm_dir)) == 2


@pytest.mark.slow
def test_bad_adapters_are_refused_and_leave_nothing(agent, vllm_server, shm_dir):
    with agent.client() as c:
        junk = c.put("/v1/adapters/j", params={"holder": "g"}, content=b"not safetensors",
                     headers={"x-tensafe-peft-config": json.dumps(peft_config(CONFIG))})
        assert junk.status_code == 409 and junk.json()["error"]["reason"] == "invalid"
        wrong = c.put("/v1/adapters/j", params={"holder": "g"}, content=adapter_body(1),
                      headers={"x-tensafe-peft-config": json.dumps({"peft_type": "PREFIX_TUNING"})})
        assert wrong.status_code == 409
        no_holder = c.put("/v1/adapters/j", content=adapter_body(1),
                          headers={"x-tensafe-peft-config": json.dumps(peft_config(CONFIG))})
        assert no_holder.status_code == 400 and no_holder.json()["error"]["param"] == "holder"
    assert files(shm_dir) == set() and vllm_server.registered() == {}


@pytest.mark.slow
def test_a_restarted_agent_reconciles_with_vllm(agent, vllm_server, shm_dir, tmp_path):
    with agent.client() as c:
        assert put(c, "kept", 1).status_code == 201
    agent.kill()  # SIGKILL: nothing is cleaned up on the way out
    (shm_dir / ".tmp-deadbeef").mkdir()  # a write a crash cut short
    (shm_dir / ".tmp-deadbeef" / "adapter_model.safetensors").write_bytes(b"half")
    stray = shm_dir / directory_name("stray")  # files vLLM never registered
    stray.mkdir()
    (stray / "name").write_text("stray")
    outside = Path(str(shm_dir) + "-outside")  # registered in vLLM behind the agent's back
    outside.mkdir()
    try:
        (outside / "adapter_model.safetensors").write_bytes(adapter_body(5))
        (outside / "adapter_config.json").write_text(json.dumps(peft_config(CONFIG)))
        r = httpx.post(vllm_server.url + "/v1/load_lora_adapter", json={"lora_name": "foreign",
                                                                          "lora_path": str(outside)}, timeout=60)
        assert r.status_code == 200
        agent.start()  # ready once reconciled
    finally:
        import shutil

        shutil.rmtree(outside, ignore_errors=True)
    assert set(vllm_server.registered()) == {"kept"}
    assert files(shm_dir) == {directory_name("kept")}
    with agent.client() as c:
        assert held(c) == {"kept"}
        assert c.delete("/v1/adapters/kept").status_code == 200  # adopted without leases
    assert files(shm_dir) == set() and vllm_server.registered() == {}
