from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from .test_tenancy import ADMIN, CHAT, HELLO, world  # noqa: F401 - the fixture


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_requests_tokens_and_cache_for_admins_only(world):  # noqa: F811
    for _ in range(3):
        r = await world.client.post(CHAT, json={"model": "a-bot", "messages": HELLO, "max_tokens": 4},
                                    headers=world.h("a"))
        assert r.status_code == 200
    await world.client.post(CHAT, json={"model": "nope", "messages": HELLO}, headers=world.h("a"))
    assert (await world.client.get("/metrics", headers=world.h("a"))).status_code == 403
    r = await world.client.get("/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    path = "/v1/chat/completions"
    assert m[("tensafe_requests_total", (("code", ""), ("path", path), ("status", "200")))] == 3
    assert m[("tensafe_requests_total", (("code", "model_not_found"), ("path", path), ("status", "404")))] == 1
    assert m[("tensafe_tokens_total", (("kind", "completion"), ("tenant", "a")))] == 12
    assert m[("tensafe_time_to_first_token_seconds_count", (("tenant", "a"),))] == 3
    assert m[("tensafe_cache_loads_total", ())] == 1
    assert m[("tensafe_cache_hits_total", (("tier", "device"),))] == 2
    assert m[("tensafe_cache_cpu_bytes", ())] > 0
    assert m[("tensafe_backend_max_sequence_slots", (("backend", "null"),))] == 32
