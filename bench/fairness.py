"""A paying tenant under a flood of free traffic, on one worker (issue 31).

    python bench/fairness.py [--free 16] [--requests 30] [--gap 0.5] [--max-tokens 8]
                             [--free-tokens 48]

A gateway and one LLaVA worker (tiny random-weight model, the CPU; 4 request threads) on a
scratch database and Redis database 12 of the local server. First a Max tenant's requests
alone, one after another, `--gap` seconds apart; then the same requests while `--free` Free
tenants (their client a process of its own) each keep one request in flight (their tier's
limit) for as long as the Max tenant's run lasts. Prints one
JSON object: the Max tenant's time to answer alone and under the flood (median, p95, their
ratios: the goals are at most 1.5x and 2x), the GPU-seconds served to each Free tenant over
the flood (the goal: the most at most 2x the least), and the longest wait of a Free request
for a worker with room (its queue_seconds; the goal: within GPUHOST_FLEET_AGING_SECONDS).
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scratch import scratch_stack  # noqa: E402
from billing import tenants  # noqa: E402
from billing.db import session_factory, sync_engine, transaction  # noqa: E402
from config.plans import DEFAULT_PLANS  # noqa: E402
from harness.processes import Gateway, Worker  # noqa: E402
from workers.tiny import make_all  # noqa: E402

AGING_SECONDS = 30.0


def ask(client: httpx.Client, key: str, tokens: int, text: str) -> dict:
    body = {
        "model": "llava-llama3",
        "stream": False,
        "messages": [{"role": "user", "content": text}],
        "options": {"num_predict": tokens, "temperature": 0.8},
    }
    started = time.perf_counter()
    answer = client.post("/api/chat", json=body, headers={"Authorization": f"Bearer {key}"})
    answer.raise_for_status()
    found = answer.json()  # Ollama's queue_duration is in nanoseconds
    return found | {
        "seconds": time.perf_counter() - started,
        "queue_seconds": found["queue_duration"] / 1e9,
    }


def generation(answer: dict) -> float:
    return (answer["prompt_eval_duration"] + answer["eval_duration"]) / 1e9


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"median": round(statistics.median(ordered), 4), "p95": round(p95, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--free", type=int, default=16)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=8, help="the Max tenant's answers")
    parser.add_argument("--free-tokens", type=int, default=48, help="the Free tenants' answers")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between Max requests")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuhost-fairness-") as scratch:
        work = Path(scratch)
        models = work / "models"
        make_all(models, "llava-llama3", "stable-diffusion")
        with scratch_stack("fairness", 12) as (database, redis_url):
            env = {
                "GPUHOST_DATABASE_URL": database,
                "GPUHOST_REDIS_URL": redis_url,
                "GPUHOST_MODELS_DIR": str(models),
                "GPUHOST_ADMISSION_WAIT_SECONDS": "60",
                "GPUHOST_FLEET_AGING_SECONDS": str(AGING_SECONDS),
            }
            sessions = session_factory(sync_engine(database))
            tiers = {tier: plan.concurrency for tier, plan in DEFAULT_PLANS.items()}
            with transaction(sessions) as session:
                made = [
                    tenants.create_tenant(session, f"t{i}", tier, tiers)
                    for i, tier in enumerate(["max"] + ["free"] * args.free)
                ]
                keys = [tenants.create_key(session, t.id)[1] for t in made]
            logs = work / "logs"
            logs.mkdir()
            worker = Worker("worker", env, logs, redis_url)
            gateway = Gateway("gateway", env, logs)
            try:
                worker.wait_ready()
                gateway.wait_ready()
                print(json.dumps(run(gateway.url, keys[0], keys[1:], args)), flush=True)
            finally:
                gateway.stop()
                worker.stop()


def flood(url: str, keys: list[str], tokens: int, stop, found) -> None:
    """In a process of its own (the Max tenant's client does not share its interpreter): each
    Free tenant keeps one request in flight until `stop`; `found` gets (GPU-seconds served by
    tenant, every Free request's queue_seconds)."""
    served = {key: 0.0 for key in keys}
    waits: list[float] = []
    started = threading.Barrier(len(keys) + 1)

    def tenant(key: str) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            started.wait()
            while not stop.is_set():
                answer = ask(client, key, tokens, "Tell me a long story.")
                served[key] += answer["gpu_seconds"]
                waits.append(answer["queue_seconds"])

    threads = [threading.Thread(target=tenant, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    started.wait()
    for thread in threads:
        thread.join()
    found.put((list(served.values()), waits))


def paced(url: str, key: str, args) -> list[dict]:
    """The Max tenant's requests, one after another, `--gap` seconds apart."""
    answers = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(args.requests):
            answers.append(ask(client, key, args.max_tokens, f"Describe picture {i}."))
            time.sleep(args.gap)  # a tenant's pace, not a synchronisation
    return answers


def run(url: str, max_key: str, free_keys: list[str], args) -> dict:
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(3):  # warm: the first answers compile and allocate
            ask(client, max_key, args.max_tokens, "warm up")
    alone_answers = paced(url, max_key, args)
    spawn = multiprocessing.get_context("spawn")
    stop, found = spawn.Event(), spawn.Queue()
    flooding = spawn.Process(target=flood, args=(url, free_keys, args.free_tokens, stop, found))
    flooding.start()
    time.sleep(2.0)  # the flood is under way (a load, not a synchronisation)
    flooded_answers = paced(url, max_key, args)
    stop.set()
    shares, waits = found.get()
    flooding.join()
    alone = [answer["seconds"] for answer in alone_answers]
    flooded = [answer["seconds"] for answer in flooded_answers]
    alone_q, flooded_q = quantiles(alone), quantiles(flooded)
    shares = sorted(shares)
    return {
        "free_tenants": len(free_keys),
        "max_requests": args.requests,
        "max_alone_seconds": alone_q,
        "max_under_flood_seconds": flooded_q,
        "max_queue_seconds": {
            "alone": quantiles([a["queue_seconds"] for a in alone_answers]),
            "under_flood": quantiles([a["queue_seconds"] for a in flooded_answers]),
        },
        "max_generation_seconds": {  # the worker's time on it (prompt, then tokens)
            "alone": quantiles([generation(a) for a in alone_answers]),
            "under_flood": quantiles([generation(a) for a in flooded_answers]),
        },
        "max_at_gateway_seconds": {  # from its arrival at the gateway to its answer
            "alone": quantiles([a["total_duration"] / 1e9 for a in alone_answers]),
            "under_flood": quantiles([a["total_duration"] / 1e9 for a in flooded_answers]),
        },
        "median_ratio": round(flooded_q["median"] / alone_q["median"], 2),
        "p95_ratio": round(flooded_q["p95"] / alone_q["p95"], 2),
        "free_gpu_seconds": {"least": round(shares[0], 3), "most": round(shares[-1], 3)},
        "free_share_ratio": round(shares[-1] / shares[0], 2) if shares[0] else None,
        "free_requests": len(waits),
        "free_longest_wait_seconds": round(max(waits), 3) if waits else None,
        "aging_bound_seconds": AGING_SECONDS,
    }


if __name__ == "__main__":
    main()
