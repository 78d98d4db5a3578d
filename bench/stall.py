"""How long hostile requests stall the gateway for everyone else (issue 24, point 1).

    python bench/stall.py [--rounds 3]

Starts a gateway (no workers: everything here happens before a request is queued) on a
scratch database and Redis database 12, then sends, one kind at a time, what a Free key can
send: a 6 MB batch of 10 chat lines, each with seven 4096x4096 PNGs (mostly zeros, about 50 KB
each) and one invalid image; three concurrent chats with seven such images each; three
`/v1/images/edits` with a 9600x9600 mask. Meanwhile it asks `/healthz` every 50 ms and reports
the longest wait (the stall) and how long the hostile requests took. The gateway runs the code
of the current directory (`python -m cli`), so running this from another checkout measures that
one: `cd OTHER && python /path/to/bench/stall.py`.
"""

import argparse
import asyncio
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scratch import scratch_stack  # noqa: E402
from billing import tenants  # noqa: E402
from billing.db import session_factory, sync_engine, transaction  # noqa: E402
from config.plans import DEFAULT_PLANS  # noqa: E402
from harness.processes import Gateway  # noqa: E402


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def attacks() -> dict[str, callable]:
    heavy = base64.b64encode(png(4096, 4096)).decode()
    invalid = base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()
    chat = {
        "model": "llava-llama3",
        "messages": [{"role": "user", "content": "hi", "images": [heavy] * 7 + [invalid]}],
    }
    line = {
        "custom_id": "x",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "llava-llama3",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}]
                    + [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b}"}}
                        for b in [heavy] * 7 + [invalid]
                    ],
                }
            ],
        },
    }
    batch = "\n".join(json.dumps(line | {"custom_id": f"line-{i}"}) for i in range(10)).encode()
    picture, mask = png(512, 512), png(9600, 9600, "RGBA")

    def batch_upload(client, key):
        files = {"file": ("batch.jsonl", batch, "application/jsonl")}
        return [client.post("/v1/batches", files=files, headers=key)]

    def chats(client, key):
        return [client.post("/api/chat", json=chat, headers=key) for _ in range(3)]

    def edits(client, key):
        files = {"image": ("i.png", picture, "image/png"), "mask": ("m.png", mask, "image/png")}
        return [
            client.post("/v1/images/edits", data={"prompt": "x"}, files=files, headers=key)
            for _ in range(3)
        ]

    return {"batch of 10x8 images": batch_upload, "3 chats of 8 images": chats, "3 edits": edits}


async def measure(url: str, key: str, attack) -> dict:
    stop, worst = asyncio.Event(), 0.0
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def probe():
            nonlocal worst
            async with httpx.AsyncClient(base_url=url, timeout=300) as health:
                while not stop.is_set():
                    asked = time.perf_counter()
                    await health.get("/healthz")
                    worst = max(worst, time.perf_counter() - asked)
                    await asyncio.sleep(0.05)

        probing = asyncio.create_task(probe())
        started = time.perf_counter()
        answers = await asyncio.gather(*attack(client, {"Authorization": f"Bearer {key}"}))
        took = time.perf_counter() - started
        await asyncio.sleep(0.2)
        stop.set()
        await probing
    return {
        "statuses": sorted({a.status_code for a in answers}),
        "attack_s": round(took, 2),
        "healthz_worst_ms": round(worst * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with scratch_stack("stall", 12) as (url, redis_url):
        with transaction(session_factory(sync_engine(url))) as session:
            tiers = {tier: plan.concurrency for tier, plan in DEFAULT_PLANS.items()}
            keys = [
                tenants.create_key(
                    session, tenants.create_tenant(session, f"t{i}", "free", tiers).id
                )[1]
                for i in range(args.rounds * 3)
            ]
        env = {"GPUHOST_DATABASE_URL": url, "GPUHOST_REDIS_URL": redis_url}
        gateway = Gateway("gateway-stall", env, Path(tempfile.mkdtemp()))
        try:
            gateway.wait_ready()
            plan = attacks()
            for round_ in range(args.rounds):
                for i, (kind, attack) in enumerate(plan.items()):
                    key = keys[round_ * 3 + i]
                    measured = asyncio.run(measure(gateway.url, key, attack))
                    print(json.dumps({"attack": kind} | measured))
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
