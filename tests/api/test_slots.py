"""Tier limits through the gateway: refusals, and slots freed on every way a request ends."""

import asyncio

import httpx
import pytest

from harness.helpers import auth, chat_body, in_flight, ndjson, png, usage_rows
from harness.processes import wait_for

pytestmark = pytest.mark.usefixtures("worker")

LONG = {"num_predict": 4000, "temperature": 0}


def open_stream(client: httpx.Client, url: str, key: str, **options):
    request = client.build_request(
        "POST", f"{url}/api/chat", json=chat_body(**options), headers=auth(key)
    )
    return client.send(request, stream=True)


class TestConcurrencyLimit:
    def test_second_free_request_is_refused_while_the_first_streams(
        self, gateway, tenant_factory, redis_client
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        with httpx.Client(timeout=60) as client:
            first = open_stream(client, gateway.url, key, **LONG)
            lines = ndjson(first)
            assert next(lines)["done"] is False  # streaming: the slot is held

            refused = client.post(
                f"{gateway.url}/api/chat", json=chat_body(num_predict=2), headers=auth(key)
            )
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert "free tier allows 1 at a time and 1 is running" in refused.json()["error"]

            first.close()  # the client goes away: its slot is freed
        wait_for(lambda: in_flight(redis_client, tenant_id) == 0, 10, "the slot to be released")

        again = httpx.post(
            f"{gateway.url}/api/chat", json=chat_body(num_predict=2), headers=auth(key), timeout=60
        )
        assert again.status_code == 200
        assert list(ndjson(again))[-1]["done"] is True

    def test_the_limit_holds_across_gateway_replicas(
        self, gateway, second_gateway, tenant_factory, redis_client
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        with httpx.Client(timeout=60) as client:
            first = open_stream(client, gateway.url, key, **LONG)
            lines = ndjson(first)  # kept: dropping the iterator would close the stream
            assert next(lines)["done"] is False
            refused = client.post(
                f"{second_gateway.url}/api/chat", json=chat_body(num_predict=2), headers=auth(key)
            )
            assert refused.status_code == 429
            first.close()
        wait_for(lambda: in_flight(redis_client, tenant_id) == 0, 10, "the slot to be released")

    async def test_pro_runs_three_at_once_and_refuses_the_fourth(
        self, gateway, tenant_factory, redis_client
    ):
        tenant_id, key, _ = tenant_factory.create("pro")
        async with httpx.AsyncClient(timeout=60) as client:
            # Headers come with the first token, so the three are opened as background tasks.
            opened = [
                asyncio.create_task(
                    client.post(
                        f"{gateway.url}/api/chat", json=chat_body(**LONG), headers=auth(key)
                    )
                )
                for _ in range(3)
            ]
            await async_wait_for(lambda: in_flight(redis_client, tenant_id) == 3, 30)
            fourth = await client.post(
                f"{gateway.url}/api/chat", json=chat_body(num_predict=2), headers=auth(key)
            )
            assert fourth.status_code == 429
            assert "pro tier allows 3 at a time and 3 are running" in fourth.json()["error"]
            for task in opened:  # the three clients go away
                task.cancel()
            await asyncio.gather(*opened, return_exceptions=True)
        await async_wait_for(lambda: in_flight(redis_client, tenant_id) == 0, 30)


async def async_wait_for(condition, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


class TestSlotReleased:
    def test_after_completion_a_free_tenant_can_go_again_at_once(
        self, gateway, tenant_factory, redis_client
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        for _ in range(3):
            response = httpx.post(
                f"{gateway.url}/api/chat",
                json=chat_body(num_predict=3),
                headers=auth(key),
                timeout=60,
            )
            assert response.status_code == 200
            assert list(ndjson(response))[-1]["done"] is True
            assert in_flight(redis_client, tenant_id) == 0

    def test_after_a_worker_side_error(self, gateway, tenant_factory, redis_client, sessions):
        tenant_id, key, _ = tenant_factory.create("free")
        # An image (576 tokens) and ~9000 words are past the 8K context window: the worker refuses.
        body = chat_body("lorem ipsum " * 4500, images=[png()], num_predict=3)
        response = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60)
        assert response.status_code == 400
        assert "context window is 8192 tokens" in response.json()["error"]
        assert in_flight(redis_client, tenant_id) == 0
        [record] = usage_rows(sessions, response.headers["x-request-id"])
        assert record.status == "rejected" and record.gpu_seconds == 0

    def test_after_client_disconnect_the_job_is_cancelled_and_billed_for_what_ran(
        self, gateway, tenant_factory, redis_client, sessions
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        with httpx.Client(timeout=60) as client:
            stream = open_stream(client, gateway.url, key, **LONG)
            request_id = stream.headers["x-request-id"]
            lines = ndjson(stream)
            assert next(lines)["done"] is False
            stream.close()
        wait_for(lambda: in_flight(redis_client, tenant_id) == 0, 10, "the slot to be released")
        [record] = wait_for(lambda: usage_rows(sessions, request_id), 30, "the usage record")
        assert record.status == "cancelled"
        assert 0 < record.output_tokens < LONG["num_predict"]
        assert record.gpu_seconds > 0  # the client pays for the time used

    def test_after_a_non_streamed_client_disconnect(
        self, gateway, tenant_factory, redis_client, sessions
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{gateway.url}/api/chat",
                json=chat_body(**LONG) | {"stream": False},
                headers=auth(key),
                timeout=1.0,
            )
        wait_for(lambda: in_flight(redis_client, tenant_id) == 0, 15, "the slot to be released")
