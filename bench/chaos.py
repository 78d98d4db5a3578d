"""Faults under load, at scale (issue 18): nothing answered goes unrecorded, nothing is
recorded twice, no tenant runs more than its tier, and the ledger equals Stripe's meter.

    python bench/chaos.py [--requests 1000] [--faults 24] [--seed 7] [--json FILE]

The stack (`bench/chaos_stack.py`, all its own): two gateways, two LLaVA workers and one
Stable Diffusion worker on tiny random-weight models, the billing relay, PostgreSQL behind a
TCP proxy, Redis (append-only, as compose runs it), RabbitMQ as the broker, and a
Stripe-compatible server. The load: streamed and non-streamed chats, images and async jobs
from two tenants of each tier (Free / Pro / Max), each sending with one more client than its
tier allows in flight, so that every tenant is sometimes over its limit. The faults, spread
over the run by progress and cycling through the six kinds in a shuffled order: a worker
SIGKILLed (a busy one), a gateway SIGKILLed, Redis restarted (SIGTERM, down for a second),
PostgreSQL unreachable for 5-15 s, the RabbitMQ node SIGKILLed and started again, and the
billing relay killed between Stripe's 2xx and its own commit. A killed process is started
again a second later, as Kubernetes would.

The clients do what a careful client of the API does: a stream cut by its gateway is resumed
on the other one (`GET /api/jobs/{id}/stream?after=N`), an async job is submitted with an
`Idempotency-Key` and sent again with it after a network failure, and a connection refused
goes to the other gateway (what a load balancer does). Prints one JSON report (below); exits
1 if an invariant broke. `tests/chaos/test_chaos_at_scale.py` runs the bounded form in CI.
"""

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.chaos.load import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--faults", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--keep", type=Path, help="keep the logs and outcomes in this folder")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.keep, args.requests, args.faults, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="gpuhost-chaos-") as workdir:
            result = run(Path(workdir), args.requests, args.faults, args.seed)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
