"""The per-tenant lease semaphore, against a real Redis."""

import asyncio
import contextlib
import uuid

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from api.access.admission import Admission, LeaseKeeper
from api.errors import TooManyRequests, Unavailable
from harness.jobs import chat_job
from harness.processes import free_port
from workers.contract import ErrorChunk
from workers.fleet_keys import FLEET_WAKE, fleet_key
from workers.keyspace import slots_key
from workers.streams import Claims, JobChannel

LIMITS = {"free": 1, "pro": 3, "max": 10}
WAITING = f"test-waiting-{uuid.uuid4().hex}"  # a job id in a model's order: a job waits


@contextlib.asynccontextmanager
async def waiting_job(client):
    """A job waiting for room on the Stable Diffusion workers, for the block (an id in the
    order only: the dispatchers of the gateways running beside pass over it)."""
    await client.zadd(fleet_key("sd", "order"), {WAITING: 0})
    try:
        yield
    finally:
        await client.zrem(fleet_key("sd", "order"), WAITING)


async def heard_until(wake, holder: str) -> list[str]:
    """The holders published on FLEET_WAKE, up to `holder`'s."""
    heard = []
    async with asyncio.timeout(30):  # a bound on a wait for an event, not a timing
        while holder not in heard:
            if message := await wake.get_message(timeout=1):  # None: a confirmation
                heard.append(message["data"].decode())
    return heard


@pytest.fixture
async def client(redis_url):
    connection = aioredis.Redis.from_url(redis_url)
    yield connection
    await connection.aclose()


def admission(client, ttl: float = 30.0) -> Admission:
    return Admission(client, LIMITS, ttl_seconds=ttl, retry_after_seconds=2)


class TestLimits:
    @pytest.mark.parametrize("tier, limit", LIMITS.items())
    async def test_a_tier_gets_exactly_its_limit(self, client, tier, limit):
        gate, tenant = admission(client), uuid.uuid4()
        for i in range(limit):
            await gate.acquire(tenant, tier, f"r{i}")
        with pytest.raises(TooManyRequests) as refused:
            await gate.acquire(tenant, tier, "one-too-many")
        assert f"the {tier} tier allows {limit} at a time" in refused.value.message
        assert refused.value.headers == {"Retry-After": "2"}
        assert await gate.in_flight(tenant) == limit

    async def test_concurrent_acquires_never_exceed_the_limit(self, client):
        gate, tenant = admission(client), uuid.uuid4()
        results = await asyncio.gather(
            *(gate.acquire(tenant, "pro", f"r{i}") for i in range(25)), return_exceptions=True
        )
        granted = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, TooManyRequests)]
        assert len(granted) == 3 and len(refused) == 22

    async def test_tenants_do_not_share_slots(self, client):
        gate, first, second = admission(client), uuid.uuid4(), uuid.uuid4()
        a = await gate.acquire(first, "free", "a")
        b = await gate.acquire(second, "free", "b")  # the first tenant's full tier is not its
        assert (a.tenant_id, b.tenant_id) == (str(first), str(second))
        assert await gate.in_flight_of([first, second]) == [1, 1]
        with pytest.raises(TooManyRequests):  # each is at its own limit
            await gate.acquire(first, "free", "c")
        await gate.release(a)
        assert await gate.in_flight_of([first, second]) == [0, 1]
        await gate.release(b)

    async def test_a_refused_request_holds_nothing(self, client):
        gate, tenant = admission(client), uuid.uuid4()
        lease = await gate.acquire(tenant, "free", "first")
        for i in range(5):
            with pytest.raises(TooManyRequests):
                await gate.acquire(tenant, "free", f"refused-{i}")
        await gate.release(lease)
        assert await gate.in_flight(tenant) == 0
        await gate.acquire(tenant, "free", "next")


class TestRelease:
    async def test_release_frees_the_slot_and_is_idempotent(self, client):
        gate, tenant = admission(client), uuid.uuid4()
        lease = await gate.acquire(tenant, "free", "a")
        await gate.release(lease)
        await gate.release(lease)
        second = await gate.acquire(tenant, "free", "b")
        await gate.release(lease)  # a stale release must not free someone else's slot
        assert await gate.in_flight(tenant) == 1
        await gate.release(second)

    async def test_a_slot_given_back_wakes_the_fleets_dispatchers(self, client):
        """A release that frees a slot while a job waits for room publishes its holder on
        FLEET_WAKE (the job starts now, not at the next pass); one that frees nothing, or
        frees a slot while nothing waits, publishes nothing. Others' wakes may come too (the
        channel is the server's): ours are told by holder, in the order they were sent."""
        gate, tenant = admission(client), uuid.uuid4()
        idle, stale, fresh = (f"{name}-{uuid.uuid4().hex}" for name in ("idle", "stale", "fresh"))
        async with client.pubsub(ignore_subscribe_messages=True) as wake, waiting_job(client):
            await wake.subscribe(FLEET_WAKE)
            await client.zrem(fleet_key("sd", "order"), WAITING)  # nothing waits
            await gate.release(await gate.acquire(tenant, "free", idle))
            await client.zadd(fleet_key("sd", "order"), {WAITING: 0})  # a job waits
            lease = await gate.acquire(tenant, "free", stale)
            await gate.release(lease)
            await gate.release(lease)  # gone already: no second wake
            await gate.release(await gate.acquire(tenant, "free", fresh))
            heard = await heard_until(wake, fresh)
        assert heard.count(stale) == 1
        assert idle not in heard

    async def test_a_worker_ending_a_job_wakes_them_too(self, client, redis_url):
        """The worker gives the slot back with its job's final chunk (`JobChannel`), or, for
        a job that ended without one, as it lets the job go (`Claims`, JOB_RELEASE): the
        same wake, once per slot."""
        gate, tenant = admission(client), uuid.uuid4()
        sync = redis.Redis.from_url(redis_url)
        claims = Claims(sync, "worker-a:1", ttl=30)
        finished = chat_job("hello", tenant_id=tenant)
        dropped = f"job-{uuid.uuid4().hex}"
        async with client.pubsub(ignore_subscribe_messages=True) as wake, waiting_job(client):
            await wake.subscribe(FLEET_WAKE)
            await gate.acquire(tenant, "pro", finished.request_id)
            await gate.acquire(tenant, "pro", dropped)
            for job_id in (finished.request_id, dropped):
                assert claims.take(job_id, tenant, retention=60) is not None
            JobChannel(sync, finished, 60).publish_final(ErrorChunk(status=500, message="x"))
            claims.release(finished.request_id)  # its slot is back already: no second wake
            claims.release(dropped)
            claims.stop()
            heard = await heard_until(wake, dropped)
        assert heard.count(finished.request_id) == 1
        assert await gate.in_flight(tenant) == 0

    async def test_a_crashed_holders_slot_comes_back_after_the_lease_ttl(self, client):
        gate, tenant = admission(client, ttl=0.3), uuid.uuid4()
        await gate.acquire(tenant, "free", "crashed")  # never renewed, never released
        with pytest.raises(TooManyRequests):
            await gate.acquire(tenant, "free", "early")
        while await gate.in_flight(tenant):
            await asyncio.sleep(0.05)
        await gate.acquire(tenant, "free", "after-expiry")

    async def test_renewal_keeps_a_running_request_admitted(self, client):
        gate, tenant = admission(client, ttl=0.4), uuid.uuid4()
        lease = await gate.acquire(tenant, "free", "long")
        for _ in range(6):
            await asyncio.sleep(0.1)
            assert await gate.renew(lease)
        with pytest.raises(TooManyRequests):
            await gate.acquire(tenant, "free", "other")

    async def test_renewing_an_expired_lease_says_so(self, client):
        gate, tenant = admission(client, ttl=0.1), uuid.uuid4()
        lease = await gate.acquire(tenant, "free", "gone")
        other = await gate.acquire(uuid.uuid4(), "free", "x")
        await gate.release(other)
        while await gate.in_flight(tenant):
            await asyncio.sleep(0.05)
        await gate.acquire(tenant, "free", "newcomer")  # drops the expired lease
        assert await gate.renew(lease) is False


class TestRecordAndKeeper:
    async def test_the_record_is_written_with_a_granted_slot_and_never_with_a_refusal(self, client):
        gate, tenant = admission(client), uuid.uuid4()
        granted, refused = f"gpuhost:test:{uuid.uuid4().hex}", f"gpuhost:test:{uuid.uuid4().hex}"
        await gate.acquire(tenant, "free", "a", (granted, "meta-a", 60))
        with pytest.raises(TooManyRequests):
            await gate.acquire(tenant, "free", "b", (refused, "meta-b", 60))
        assert await client.get(granted) == b"meta-a"
        assert 0 < await client.ttl(granted) <= 60
        assert await client.exists(refused) == 0
        await client.delete(granted)

    async def test_the_keeper_renews_every_lease_it_holds_and_none_it_dropped(self, client):
        gate = admission(client, ttl=0.5)
        keeper = LeaseKeeper(gate, 0.5)
        tenants = [uuid.uuid4() for _ in range(3)]
        leases = [await gate.acquire(t, "free", f"r-{i}") for i, t in enumerate(tenants)]
        for lease in leases:
            keeper.hold(lease)
        keeper.drop(leases[2])
        for _ in range(6):  # 0.9 s: well past the TTL, renewed at a third of it
            await asyncio.sleep(0.15)
            await keeper.renew()
        assert [await gate.in_flight(t) for t in tenants] == [1, 1, 0]
        for lease in leases:
            await gate.release(lease)


class TestInFlight:
    async def test_in_flight_of_many_tenants_at_once(self, client):
        gate, busy, idle = admission(client), uuid.uuid4(), uuid.uuid4()
        leases = [await gate.acquire(busy, "pro", f"r{i}") for i in range(2)]
        assert await gate.in_flight_of([busy, idle, busy]) == [2, 0, 2]
        assert await gate.in_flight_of([]) == []
        for lease in leases:
            await gate.release(lease)


class TestRedisErrors:
    async def test_unreachable_redis_refuses_with_503_never_allows(self):
        dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
        with pytest.raises(Unavailable) as refused:
            await admission(dead).acquire(uuid.uuid4(), "max", "r")
        assert refused.value.status == 503
        await dead.aclose()

    async def test_a_command_redis_refuses_is_a_bug_not_an_outage(self, client):
        tenant = uuid.uuid4()
        await client.set(slots_key(tenant), "not a sorted set")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await admission(client).acquire(tenant, "max", "r")
