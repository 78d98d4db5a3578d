"""The Stable Diffusion engine in process: how requests that arrive together are batched."""

import threading
import time
import uuid

import pytest

from workers.contract import ImageJob
from workers.engines.diffusion import DiffusionEngine


class Sink:
    def progress(self, step: int, steps: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def job(seed: int) -> ImageJob:
    return ImageJob(
        request_id=uuid.uuid4().hex,
        tenant_id=uuid.uuid4(),
        api_key_id=None,
        model="stable-diffusion",
        kind="txt2img",
        prompt="a lighthouse",
        width=64,
        height=64,
        steps=25,
        guidance_scale=7.5,
        scheduler="euler",
        seed=seed,
        n=1,
        enqueued_at=time.time(),
    )


def staggered(engine: DiffusionEngine, count: int, gap: float) -> list:
    """`count` requests of one shape, one every `gap` seconds, each from its own thread."""
    results = [None] * count

    def one(i: int) -> None:
        results[i] = engine.render(job(i), Sink())

    threads = []
    for i in range(count):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        time.sleep(gap)
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize(
    ("window", "expected"),
    [(0.0, [1, 2, 2]), (2.0, [3, 3, 3])],
    ids=["no-window-first-runs-alone", "window-gathers-the-burst"],
)
def test_an_idle_engine_waits_its_window_for_a_burst(models_dir, window, expected):
    engine = DiffusionEngine(
        "stable-diffusion",
        models_dir / "stable-diffusion",
        device="cpu",
        batch_window_seconds=window,
    )
    try:
        staggered(engine, 1, 0)  # first run's one-off costs out of the way
        results = staggered(engine, 3, 0.01)
    finally:
        engine.close()
    assert [r.batch_images for r in results] == expected
    # However they were grouped, each request's image is its own seed's.
    assert len({r.images[0] for r in results}) == 3


def test_warming_shapes_at_load_is_never_billed_and_changes_no_image(models_dir):
    """The GPU warm-up (every batch size of a size, at load) runs the real pipeline: called
    here on the CPU, it leaves the meter and the images requests get as they were."""
    engine = DiffusionEngine(
        "stable-diffusion", models_dir / "stable-diffusion", device="cpu", max_batch_images=3
    )
    try:
        before = staggered(engine, 1, 0)[0]
        busy, billed = engine.meter.busy_seconds, engine.meter.billed_seconds
        engine._warm(((64, 64), (64, 32)))
        assert (engine.meter.busy_seconds, engine.meter.billed_seconds) == (busy, billed)
        assert engine.batches == 1  # warm-up batches are not requests' batches
        after = staggered(engine, 1, 0)[0]
    finally:
        engine.close()
    assert after.images == before.images  # same seed, same image: warm-up left no state
