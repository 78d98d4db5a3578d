"""Stable Diffusion engine: billed GPU-seconds per image at 1, 4 and 8 concurrent requests.

    python bench/sd_engine.py                                  # tiny random-weight SD, CPU
    python bench/sd_engine.py --model DIR --device cuda --size 512 --steps 25

Runs the engine the `sd` workers use (micro-batching, per-request metering) in process; each
request asks for one image of the same shape, so concurrent requests share batches.
"""

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

from workers.contract import ImageJob
from workers.engines.diffusion import DiffusionEngine


class Sink:
    def progress(self, step: int, steps: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def job(size: int, steps: int, seed: int) -> ImageJob:
    return ImageJob(
        request_id=uuid.uuid4().hex,
        tenant_id=uuid.uuid4(),
        api_key_id=None,
        model="sd",
        kind="txt2img",
        prompt=f"a lighthouse at dusk, variant {seed}",
        width=size,
        height=size,
        steps=steps,
        guidance_scale=7.5,
        scheduler="euler",
        seed=seed,
        n=1,
        enqueued_at=time.time(),
    )


def run(engine: DiffusionEngine, concurrent: int, size: int, steps: int) -> dict:
    results = [None] * concurrent
    busy = engine.meter.busy_seconds

    def one(i: int) -> None:
        results[i] = engine.render(job(size, steps, i), Sink())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrent)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    billed = [r.gpu_seconds for r in results]
    return {
        "concurrent": concurrent,
        "size": size,
        "steps": steps,
        "wall_seconds": round(wall, 3),
        "billed_seconds_per_image": round(sum(billed) / concurrent, 4),
        "largest_batch": max(r.batch_images for r in results),
        "billed_over_busy": round(sum(billed) / (engine.meter.busy_seconds - busy), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="SD weights (default: make tiny ones)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from workers.tiny import make_stable_diffusion

            model = make_stable_diffusion(Path(scratch) / "stable-diffusion")
        engine = DiffusionEngine("sd", model, device=args.device, max_batch_images=8)
        try:
            run(engine, 1, args.size, 2)  # warm-up
            for concurrent in (1, 4, 8):
                print(json.dumps(run(engine, concurrent, args.size, args.steps)), flush=True)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
