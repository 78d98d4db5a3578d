"""Redis restarted under load (issue 10's fault injection): a gateway and a worker on a
redis-server of their own, chat requests from two tenants in flight, and Redis killed
(SIGKILL, no persistence: slots, streams and queued messages are gone) and started again.
Every request ends, answered or with a clear error, none hangs; no request is recorded twice,
every answered one is recorded with what it reported; and the service recovers by itself:
new requests are answered once Redis is back, without restarting anything."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness.helpers import auth, chat_body, usage_rows
from harness.processes import Gateway, RedisServer, Worker, wait_for

pytestmark = pytest.mark.services  # servers of its own: gpuhost dev's too, embedded

REQUESTS = 16


def test_a_redis_restart_under_load_loses_nothing_and_heals(
    stack_env, tenant_factory, sessions, tmp_path
):
    server = RedisServer(tmp_path)
    server.start()
    env = stack_env | {
        "GPUHOST_REDIS_URL": server.url,
        "GPUHOST_LEASE_TTL_SECONDS": "5",
        "GPUHOST_CLAIM_TTL_SECONDS": "1",
        "GPUHOST_VISIBILITY_TIMEOUT_SECONDS": "2",
        "GPUHOST_RESTORE_INTERVAL_SECONDS": "0.5",
        "GPUHOST_QUEUE_TIMEOUT_SECONDS": "20",
        "GPUHOST_IDLE_TIMEOUT_SECONDS": "20",
    }
    gateway = Gateway("gateway-redis", env, tmp_path)
    worker = Worker("worker-redis", env, tmp_path, server.url)
    try:
        gateway.wait_ready()
        worker.wait_ready()
        tenants = [tenant_factory.create("max")[:2] for _ in range(2)]

        def one(index: int) -> dict:
            tenant_id, key = tenants[index % 2]
            stream = index % 2 == 0
            started = time.monotonic()
            try:
                response = httpx.post(
                    f"{gateway.url}/api/chat",
                    json=chat_body(num_predict=60) | {"stream": stream},
                    headers=auth(key),
                    timeout=90,
                )
            except httpx.TimeoutException:
                return {"index": index, "outcome": "hung"}
            lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
            last = lines[-1] if lines else {}
            return {
                "index": index,
                "status": response.status_code,
                "request_id": response.headers.get("x-request-id"),
                "done": bool(last.get("done")),
                "gpu_seconds": last.get("gpu_seconds"),
                "error": last.get("error"),
                "seconds": time.monotonic() - started,
            }

        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = []
            for index in range(REQUESTS):
                futures.append(pool.submit(one, index))
                time.sleep(0.1)
                if index == REQUESTS // 2:
                    server.kill()
                    time.sleep(1.0)
                    server.start()
            outcomes = [f.result(timeout=180) for f in futures]

        hung = [o for o in outcomes if o.get("outcome") == "hung"]
        assert not hung, outcomes
        answered = [o for o in outcomes if o["done"] and o["status"] == 200]
        failed = [o for o in outcomes if not o["done"]]
        assert len(answered) + len(failed) == REQUESTS, outcomes
        for outcome in failed:  # a clear error: an HTTP error status, or a final error frame
            assert outcome["error"], outcome
            assert outcome["status"] in (200, 429, 503, 504), outcome
        for outcome in answered:
            [record] = usage_rows(sessions, outcome["request_id"])
            assert record.gpu_seconds == pytest.approx(outcome["gpu_seconds"], abs=1e-6)
        for outcome in failed:
            if outcome["request_id"]:
                assert len(usage_rows(sessions, outcome["request_id"])) <= 1

        tries = []

        def heals() -> bool:
            answer = httpx.post(
                f"{gateway.url}/api/chat",
                json=chat_body(num_predict=3) | {"stream": False},
                headers=auth(tenants[0][1]),
                timeout=30,
            )
            tries.append((answer.status_code, answer.text[:200]))
            return answer.status_code == 200

        healed_at = time.monotonic()
        try:
            wait_for(heals, 60, "a new request to be answered after the restart", interval=0.5)
        except AssertionError:
            raise AssertionError(f"not healed: {tries[-3:]}\n{worker.tail()}") from None
        print(
            "REDIS-RESTART "
            + json.dumps(
                {
                    "requests": REQUESTS,
                    "answered": len(answered),
                    "clear_errors": len(failed),
                    "hung": len(hung),
                    "statuses": sorted({o["status"] for o in failed}),
                    "errors": sorted({o["error"] for o in failed}),
                    "healed_within_seconds": round(time.monotonic() - healed_at, 2),
                }
            )
        )
    finally:
        gateway.stop()
        worker.stop()
        server.kill()
