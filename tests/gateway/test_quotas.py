"""One contract for every Quotas implementation, rerun per implementation by overriding the
``quotas`` fixture (in-process, and Redis on a real redis-server); time is an injected clock."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.errors import RateLimited
from gateway.tenancy.quotas import Admission, InProcessQuotas, QuotaLimits, RedisQuotas
from tests.gateway.conftest import validate


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


async def outcomes(quotas, tenant: str, limits: QuotaLimits, n: int, tokens: int = 0) -> tuple[list, list]:
    """``n`` concurrent admits: (admissions, refusals); anything else is re-raised."""
    results = await asyncio.gather(*(quotas.admit(tenant, limits, tokens) for _ in range(n)), return_exceptions=True)
    for r in results:
        if not isinstance(r, (Admission, RateLimited)):
            raise r
    return [r for r in results if isinstance(r, Admission)], [r for r in results if isinstance(r, RateLimited)]


class TestQuotaLimits:
    def test_round_trips_through_a_dict(self):
        limits = QuotaLimits(requests_per_min=10, tokens_per_min=0, concurrent=2, max_upload_bytes=1 << 20)
        assert QuotaLimits.from_dict(limits.to_dict()) == limits
        assert limits.to_dict()["max_tokens"] is None and limits.to_dict()["tokens_per_min"] == 0

    def test_empty_dict_is_unlimited(self):
        assert QuotaLimits.from_dict({}) == QuotaLimits()
        limits = QuotaLimits().to_dict()
        assert limits.pop("weight") == 1.0 and set(limits.values()) == {None}  # the weight is a share, not a limit

    @pytest.mark.parametrize("weight", [0, -1, 1001, "2", True, float("nan")])
    def test_weight_is_a_positive_number_within_bounds(self, weight):
        with pytest.raises(ValueError, match="weight"):
            QuotaLimits.from_dict({"weight": weight})
        assert QuotaLimits.from_dict({"weight": 2}).weight == 2.0
        assert QuotaLimits.stored({"weight": weight}).weight == 1.0  # a stored oddity never fails a request

    def test_unknown_key_is_named(self):
        with pytest.raises(ValueError, match="'requests_per_hour'"):
            QuotaLimits.from_dict({"requests_per_hour": 5})

    @pytest.mark.parametrize("value", [-1, 1.5, "10", True])
    def test_rejects_values_other_than_non_negative_ints(self, value):
        with pytest.raises(ValueError, match="concurrent"):
            QuotaLimits.from_dict({"concurrent": value})


class QuotasContract:
    """Subclasses provide ``quotas``, driven by the ``clock`` fixture."""

    async def test_unlimited_admits_always(self, quotas):
        admitted, refused = await outcomes(quotas, "t", QuotaLimits(max_tokens=5), 200, tokens=10**9)
        assert len(admitted) == 200 and not refused
        for a in admitted:
            await a.release(0)

    async def test_requests_per_minute_admits_exactly_the_limit(self, quotas):
        admitted, refused = await outcomes(quotas, "t", QuotaLimits(requests_per_min=10), 50)
        assert len(admitted) == 10 and len(refused) == 40
        assert all(e.retry_after >= 1 for e in refused)
        assert {e.message for e in refused} == {"requests per minute limit of 10 reached"}

    async def test_requests_refill_continuously(self, quotas, clock):
        limits = QuotaLimits(requests_per_min=10)
        await outcomes(quotas, "t", limits, 10)
        with pytest.raises(RateLimited) as refused:
            await quotas.admit("t", limits, 0)
        assert refused.value.retry_after == 6  # one request per 6 s at 10/min
        clock.advance(5)
        with pytest.raises(RateLimited):
            await quotas.admit("t", limits, 0)
        clock.advance(1)
        admitted, refused_now = await outcomes(quotas, "t", limits, 5)
        assert len(admitted) == 1 and len(refused_now) == 4

    async def test_tokens_per_minute(self, quotas, clock):
        limits = QuotaLimits(tokens_per_min=100)
        await quotas.admit("t", limits, 60)
        with pytest.raises(RateLimited) as refused:
            await quotas.admit("t", limits, 50)
        assert refused.value.message == "tokens per minute limit of 100 reached: requested 50, 40 available"
        assert refused.value.retry_after == 6  # 10 tokens short at 100/min
        await quotas.admit("t", limits, 40)
        clock.advance(30)
        await quotas.admit("t", limits, 50)
        with pytest.raises(RateLimited):
            await quotas.admit("t", limits, 1)

    async def test_request_larger_than_the_tokens_limit_is_refused(self, quotas):
        with pytest.raises(RateLimited, match="request of 101 tokens exceeds the tokens per minute limit of 100"):
            await quotas.admit("t", QuotaLimits(tokens_per_min=100), 101)

    async def test_concurrency_limit_and_release_frees_a_slot(self, quotas):
        limits = QuotaLimits(concurrent=2)
        admitted, refused = await outcomes(quotas, "t", limits, 5)
        assert len(admitted) == 2 and len(refused) == 3
        assert refused[0].message == "concurrent requests limit of 2 reached" and refused[0].retry_after >= 1
        await admitted[0].release(0)
        admitted_after, refused_after = await outcomes(quotas, "t", limits, 3)
        assert len(admitted_after) == 1 and len(refused_after) == 2

    async def test_release_refunds_unused_tokens(self, quotas):
        limits = QuotaLimits(tokens_per_min=100)
        first = await quotas.admit("t", limits, 100)
        await first.release(30)  # 70 back
        second = await quotas.admit("t", limits, 70)
        with pytest.raises(RateLimited):
            await quotas.admit("t", limits, 1)
        await second.release(500)  # used more than estimated: nothing back, nothing more taken
        with pytest.raises(RateLimited, match="requested 1, 0 available"):
            await quotas.admit("t", limits, 1)

    async def test_release_is_idempotent(self, quotas):
        limits = QuotaLimits(tokens_per_min=100, concurrent=2)
        a = await quotas.admit("t", limits, 50)
        await quotas.admit("t", limits, 50)
        await a.release(0)
        await a.release(0)  # neither a second refund nor a second freed slot
        await quotas.admit("t", limits, 50)
        with pytest.raises(RateLimited, match="concurrent requests limit of 2"):
            await quotas.admit("t", limits, 0)
        with pytest.raises(RateLimited, match="tokens per minute"):
            await quotas.admit("t", QuotaLimits(tokens_per_min=100), 1)

    async def test_a_refusal_takes_nothing(self, quotas):
        limits = QuotaLimits(requests_per_min=2, tokens_per_min=100, concurrent=1)
        a = await quotas.admit("t", limits, 60)
        with pytest.raises(RateLimited, match="concurrent"):
            await quotas.admit("t", limits, 10)
        await a.release(60)
        with pytest.raises(RateLimited, match="tokens per minute"):
            await quotas.admit("t", limits, 50)
        b = await quotas.admit("t", limits, 40)  # the refusals took no request and no tokens
        await b.release(40)
        with pytest.raises(RateLimited, match="requests per minute limit of 2"):
            await quotas.admit("t", limits, 0)

    async def test_tenants_are_independent(self, quotas):
        limits = QuotaLimits(requests_per_min=1, tokens_per_min=10, concurrent=1)
        await quotas.admit("alice", limits, 10)
        with pytest.raises(RateLimited):
            await quotas.admit("alice", limits, 0)
        assert isinstance(await quotas.admit("bob", limits, 10), Admission)

    async def test_refusal_is_an_openai_rate_limit_error(self, quotas):
        limits = QuotaLimits(requests_per_min=1)
        await quotas.admit("t", limits, 0)
        with pytest.raises(RateLimited) as refused:
            await quotas.admit("t", limits, 0)
        err = refused.value
        body = err.body()
        validate(body, "ErrorResponse")
        assert err.status == 429
        assert body["error"]["type"] == "rate_limit_exceeded" and body["error"]["code"] == "rate_limit_exceeded"
        assert err.headers() == {"retry-after": "60"}

    async def test_rejects_negative_tokens(self, quotas):
        with pytest.raises(ValueError, match="tokens"):
            await quotas.admit("t", QuotaLimits(tokens_per_min=10), -1)


class TestInProcessQuotas(QuotasContract):
    @pytest.fixture()
    async def quotas(self, clock):
        quotas = InProcessQuotas(clock=clock)
        yield quotas
        await quotas.close()


class TestRedisQuotas(QuotasContract):
    @pytest.fixture()
    async def quotas(self, redis_client, clock):
        quotas = RedisQuotas(redis_client, clock=clock, lease_s=30)
        yield quotas
        await quotas.close()

    async def test_two_replicas_share_the_limits(self, quotas, redis_server, clock):
        other_client = aioredis.from_url(redis_server.url)
        try:
            other = RedisQuotas(other_client, clock=clock)
            limits = QuotaLimits(requests_per_min=10)
            results = await asyncio.gather(*(replica.admit("t", limits, 0)
                                             for _ in range(25) for replica in (quotas, other)),
                                           return_exceptions=True)
        finally:
            await other_client.aclose()
        assert sum(isinstance(r, Admission) for r in results) == 10
        assert sum(isinstance(r, RateLimited) for r in results) == 40

    async def test_expired_concurrency_lease_is_dropped(self, quotas, redis_client, clock):
        limits = QuotaLimits(concurrent=1)
        await quotas.admit("t", limits, 0)  # never released: its replica died
        with pytest.raises(RateLimited, match="concurrent"):
            await quotas.admit("t", limits, 0)
        clock.advance(31)  # past lease_s=30
        await quotas.admit("t", limits, 0)
        assert await redis_client.zcard("tensafe:quota:{t}:inflight") == 1

    async def test_keys_expire_when_idle(self, quotas, redis_client):
        await quotas.admit("t", QuotaLimits(requests_per_min=5, concurrent=1), 0)
        assert 0 < await redis_client.pttl("tensafe:quota:{t}:buckets") <= 61_000
        assert 0 < await redis_client.pttl("tensafe:quota:{t}:inflight") <= 30_000 + 61_000

    async def test_unlimited_touches_no_keys(self, quotas, redis_client):
        admission = await quotas.admit("t", QuotaLimits(max_adapters=3), 100)
        await admission.release(0)
        assert await redis_client.keys("*") == []

    async def test_server_time_by_default(self, redis_client):
        quotas = RedisQuotas(redis_client, prefix="server-time:")
        limits = QuotaLimits(requests_per_min=1)
        await quotas.admit("t", limits, 0)
        with pytest.raises(RateLimited) as refused:
            await quotas.admit("t", limits, 0)
        assert refused.value.retry_after in (59, 60)
        assert await redis_client.exists("server-time:{t}:buckets") == 1
