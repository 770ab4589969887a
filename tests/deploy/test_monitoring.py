"""The dashboard and the rules against a real gateway: one runs on uvicorn (the null backend in
a pool named as the cpu overlay names its pool), serves chat completions, streams and a tenant's
uploaded adapter, and is scraped with a metrics-scope key. Every metric the dashboard and the
rules use must be in that scrape; promtool's unit tests get their input series from it (the
scraped names and label sets, with values made up for each case), so renamed metrics or labels
break them; and a real Prometheus scrapes the gateway with the rules loaded."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from adapters.keys import current_recipient_from_document, generate_signing_key
from adapters.package import pack
from gateway.app import create_app
from tests.adapters.builders import SMOLLM2, lora_tensors, peft_config, write_peft_dir
from tests.gateway.conftest import BASE, Server, settings
from tests.prometheus_server import PrometheusServer

from .render import DEPLOY, by_name_prefix

RULES = DEPLOY / "monitoring" / "rules.yaml"
DASHBOARD = DEPLOY / "monitoring" / "dashboard.json"
ADMIN = "tsk-admin-deploy-monitoring"
POOL = "cpu"
METRIC = re.compile(r"(?<![\w:])tensafe_[a-z0-9_]+")
pytestmark = pytest.mark.slow


def promtool() -> str:
    path = shutil.which("promtool")
    assert path is not None, "promtool is needed (apt-get install -y prometheus)"
    return path


def rule_expressions() -> dict[str, str]:
    return {r.get("record") or r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"]
            for r in g["rules"]}


def dashboard_expressions() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in d["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


@contextlib.contextmanager
def running_gateway(tmp: Path) -> Iterator[tuple[Server, str, str]]:
    """A gateway with pool ``cpu`` that has served plain and streamed chats, on the base model
    and on a tenant's uploaded adapter; a metrics-scope key for it and the tenant's key."""
    s = settings(tmp, admin_key=ADMIN, pools=[{"name": POOL, "kind": "null"}], null_tokens=8,
                 health_interval_s=3600)
    with Server(create_app(s)) as server:
        admin = {"authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.post("/admin/tenants", json={"id": "acme"}, headers=admin).status_code == 201
            key = c.post("/admin/tenants/acme/keys", json={"scopes": ["tenant", "tenant-admin"]}, headers=admin).json()["key"]
            tenant = {"authorization": f"Bearer {key}"}
            signer = generate_signing_key()
            pems = {k: v.decode() for k, v in signer.public_key().to_pems().items()}
            assert c.post("/v1/signing-keys", json=pems, headers=tenant).status_code == 201
            recipient = current_recipient_from_document(c.get("/v1/tssp/recipient").json())
            src = write_peft_dir(tmp / "peft", peft_config(4, ("q_proj",), alpha=8), lora_tensors(SMOLLM2, 4, ("q_proj",), seed=3))
            package = pack(src, tenant="acme", name="support", version="1", base_model=BASE, signer=signer,
                           recipient=recipient)
            r = c.post("/v1/adapters", content=package, headers={**tenant, "content-type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            for model in (BASE, "support"):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
                assert c.post("/v1/chat/completions", json=body, headers=tenant).status_code == 200
                with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=tenant) as s_:
                    assert s_.status_code == 200 and "[DONE]" in s_.read().decode()
            metrics = c.post("/admin/keys", json={"scopes": ["metrics"], "name": "monitoring"}, headers=admin)
            assert metrics.status_code == 201, metrics.text
            assert c.get("/metrics", headers=tenant).status_code in (401, 403)  # a tenant key reads no metrics
        yield server, metrics.json()["key"], key


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[tuple[Server, str, str]]:
    with running_gateway(tmp_path_factory.mktemp("deploy-monitoring")) as g:
        yield g


@pytest.fixture(scope="module")
def scrape(gateway) -> list:
    server, key, _ = gateway
    r = httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200
    return [s for family in text_string_to_metric_families(r.text) for s in family.samples]


def test_the_rules_are_valid_and_the_prometheusrule_wraps_them():
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for overlay in ("cpu", "vllm"):
        from .render import one

        wrapped = one(overlay, "PrometheusRule", "tensafe")
        assert wrapped["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], \
            "prometheusrule.yaml is stale: python deploy/monitoring/prometheusrule.py"
        dashboard = by_name_prefix(overlay, "ConfigMap", "tensafe-dashboard")
        assert json.loads(dashboard["data"]["tensafe.json"]) == json.loads(DASHBOARD.read_text())
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_every_metric_the_dashboard_and_rules_use_is_in_a_real_scrape(scrape):
    names = {s.name for s in scrape}
    used: dict[str, set[str]] = {}
    for where, exprs in (("dashboard", dashboard_expressions()), ("rules", list(rule_expressions().values()))):
        for e in exprs:
            for name in METRIC.findall(e):
                used.setdefault(name, set()).add(where)
    assert len(used) >= 14
    missing = {name: sorted(w) for name, w in used.items() if name not in names}
    assert not missing, f"not in the gateway's /metrics: {missing}"
    # what the dashboard was asked to show
    for metric in ("tensafe_ttft_seconds_bucket", "tensafe_itl_seconds_bucket", "tensafe_tokens_total",
                   "tensafe_requests_total", "tensafe_queue_depth", "tensafe_held_requests", "tensafe_cache_hits_total",
                   "tensafe_cache_misses_total", "tensafe_adapter_loads_total", "tensafe_pool_backends",
                   "tensafe_backend_up", "tensafe_store_up"):
        assert "dashboard" in used.get(metric, ()), metric
    # recording rules' outputs the dashboard or alerts read are defined by the rules
    defined = set(rule_expressions())
    for e in [*dashboard_expressions(), *rule_expressions().values()]:
        for name in re.findall(r"\b[a-z_]+:tensafe_[a-z0-9_:]+", e):
            assert name in defined, name


def _series(sample, **extra: str) -> str:
    labels = {**sample.labels, "job": "tensafe-gateway", "instance": "10.0.0.1:8000", **extra}
    return sample.name + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def _inputs(scrape, *, fast_share: float, backend_up: int, store_up: int, held: int) -> list[dict[str, str]]:
    """Input series for promtool: every scraped series the rules read, with these values (one
    sample a minute for 90 minutes). First tokens: 60 a minute, ``fast_share`` of them at 0.25 s
    and the rest at 5 s."""
    n, steps = 60, 90
    series = []
    by_name: dict[str, list] = {}
    for s in scrape:
        by_name.setdefault(s.name, []).append(s)
    for s in by_name["tensafe_ttft_seconds_bucket"]:
        le = float(s.labels["le"])
        per_min = 0 if le < 0.25 else round(n * fast_share) if le < 5 else n
        series.append({"series": _series(s), "values": f"0+{per_min}x{steps}"})
    for s in by_name["tensafe_ttft_seconds_count"]:
        series.append({"series": _series(s), "values": f"0+{n}x{steps}"})
    for s in by_name["tensafe_backend_up"]:
        series.append({"series": _series(s), "values": f"{backend_up}x{steps}"})
    for s in by_name["tensafe_store_up"]:
        series.append({"series": _series(s), "values": f"{store_up}x{steps}"})
    for s in by_name["tensafe_held_requests"]:
        series.append({"series": _series(s), "values": f"{held}x{steps}"})
    states = {s.labels["state"]: s for s in by_name["tensafe_pool_backends"] if s.labels["pool"] == POOL}
    assert {"ready", "starting", "down"} <= set(states), states
    for state, s in states.items():
        count = {"ready": backend_up, "down": 1 - backend_up}.get(state, 0)
        series.append({"series": _series(s), "values": f"{count}x{steps}"})
    return series


ALERTS = ("TensafeTTFTBudgetBurnFast", "TensafeTTFTBudgetBurnSlow", "TensafeBackendDown", "TensafePoolBackendsDown",
          "TensafeStoreUnavailable", "TensafeRequestsHeldTooLong", "TensafeTooManyHeldRequests")


def test_alerts_fire_on_scraped_series_when_they_should_and_only_then(scrape, tmp_path):
    assert set(ALERTS) == {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                           if "alert" in r}
    bad = _inputs(scrape, fast_share=0.3, backend_up=0, store_up=0, held=300)
    good = _inputs(scrape, fast_share=0.95, backend_up=1, store_up=1, held=0)
    tests = [
        {"name": "slow first tokens, a backend down, the store down, requests held", "interval": "1m",
         "input_series": bad, "promql_expr_test": [
             {"expr": "round(100 * pool:tensafe_ttft_slow:ratio_rate5m)", "eval_time": "70m",
              "exp_samples": [{"labels": f'{{pool="{POOL}"}}', "value": 70}]},
             {"expr": 'max by (alertname) (ALERTS{alertstate="firing"})', "eval_time": "80m",
              "exp_samples": [{"labels": f'{{alertname="{a}"}}', "value": 1} for a in ALERTS]},
             # the fast burn needs its 2 minutes; the slow one its 15. Groups are evaluated
             # independently (promtool in no fixed order), so the alerts may see the recording
             # rules' series one evaluation late: 1 minute for the first sample, 2 pending, 1 late
             {"expr": 'max by (alertname) (ALERTS{alertname=~"TensafeTTFT.*", alertstate="firing"})', "eval_time": "4m",
              "exp_samples": [{"labels": '{alertname="TensafeTTFTBudgetBurnFast"}', "value": 1}]},
         ]},
        {"name": "fast first tokens, everything up, nothing held", "interval": "1m", "input_series": good,
         "promql_expr_test": [
             {"expr": "round(100 * pool:tensafe_ttft_slow:ratio_rate1h)", "eval_time": "80m",
              "exp_samples": [{"labels": f'{{pool="{POOL}"}}', "value": 5}]},
             {"expr": "ALERTS", "eval_time": "80m", "exp_samples": []},
         ]},
    ]
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    done = subprocess.run([promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_real_prometheus_loads_the_rules_and_records_from_the_gateway(gateway):
    server, key, tenant = gateway
    prom = PrometheusServer([server.url.removeprefix("http://")], bearer=key, interval_s=0.5, rule_files=[RULES])
    try:
        prom.wait_scraped()
        with httpx.Client(base_url=server.url, timeout=30, headers={"authorization": f"Bearer {tenant}"}) as c:
            body = {"model": BASE, "messages": [{"role": "user", "content": "again"}], "max_tokens": 4}
            for _ in range(3):  # first tokens between two scrapes, so the rates have something
                time.sleep(0.6)
                assert c.post("/v1/chat/completions", json=body).status_code == 200
        groups = httpx.get(f"{prom.url}/api/v1/rules").json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(rules) == set(rule_expressions())
        deadline = time.monotonic() + 30
        wanted = ("pool:tensafe_first_tokens:rate5m", "pool:tensafe_held_requests:sum", "pool:tensafe_ttft_seconds:p90_5m")
        found: dict[str, list] = {}
        while time.monotonic() < deadline:
            found = {name: httpx.get(f"{prom.url}/api/v1/query", params={"query": name}).json()["data"]["result"]
                     for name in wanted}
            rules = {r["name"]: r for g in httpx.get(f"{prom.url}/api/v1/rules").json()["data"]["groups"]
                     for r in g["rules"]}
            if all(found.values()) and all(r.get("health") == "ok" for r in rules.values()):
                break
            time.sleep(0.5)
        bad = {n: (r.get("health"), r.get("lastError")) for n, r in rules.items() if r.get("health") != "ok"}
        assert not bad, bad
        for name in wanted:
            assert [s["metric"].get("pool") for s in found[name]] == [POOL], (name, found[name])
        assert float(found["pool:tensafe_held_requests:sum"][0]["value"][1]) == 0
        assert float(found["pool:tensafe_first_tokens:rate5m"][0]["value"][1]) > 0
    finally:
        prom.stop()


async def test_a_gateway_whose_pool_is_at_zero_passes_its_probes(tmp_path):
    """The gateways' readiness probe path answers 200 while their pool has no backend (scaled to
    zero), so they stay in the Service and take the requests that bring the pool up."""
    from .render import container, one

    probes = container(one("cpu", "Deployment", "tensafe-gateway"), "gateway")
    paths = {probes[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    pool = {"name": POOL, "kind": "tensafe", "discovery": "dns", "dns_name": "nothing.invalid", "dns_port": 8100,
            "token": "wk-x"}

    async def nothing(host: str, port: int) -> set[str]:
        return set()

    app = create_app(settings(tmp_path, pools=[pool], health_interval_s=3600), resolver=nothing)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                                                   base_url="http://gateway") as c:
        for path in paths:
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/ready")).status_code == 503  # why readiness is not /ready
