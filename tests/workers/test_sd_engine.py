"""The Stable Diffusion engine in process: how requests that arrive together are batched."""

import base64
import io
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from harness.jobs import image_job
from storage import Storage, tenant_key
from tests.workers.conftest import graphs_compiled
from workers.contract import ImageJob, WorkerStatus
from workers.engines.diffusion import DiffusionEngine
from workers.tiny import make_lora_adapter


class Sink:
    def progress(self, step: int, steps: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def job(seed: int) -> ImageJob:
    return image_job(seed=seed)


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


def test_the_warm_up_runs_every_batch_size_at_its_step_count(models_dir, monkeypatch):
    """`warm_steps` (GPUHOST_SD_WARM_STEPS) is how many steps each warm-up batch denoises."""
    from workers.engines import diffusion

    calls = []
    run = diffusion.TextToImage.__call__

    def counted(pipe, *args, **kwargs):
        calls.append((len(kwargs["prompt"]), kwargs["num_inference_steps"]))
        return run(pipe, *args, **kwargs)

    monkeypatch.setattr(diffusion.TextToImage, "__call__", counted)
    engine = DiffusionEngine(
        "stable-diffusion",
        models_dir / "stable-diffusion",
        device="cpu",
        max_batch_images=3,
        warm_steps=5,
    )
    try:
        engine._warm(((64, 64),))
    finally:
        engine.close()
    assert calls == [(1, 5), (2, 5), (3, 5)]
    with pytest.raises(ValueError, match="warm_steps must be at least 1, not 0"):
        DiffusionEngine("sd", models_dir / "stable-diffusion", device="cpu", warm_steps=0)


def reference(color: str = "red") -> str:
    """A reference image for a style: a pattern, so that the encoder sees more than a colour."""
    image = Image.new("RGB", (48, 48), color)
    image.paste("white", (0, 0, 24, 24))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))), dtype=np.int16)


def test_a_compiled_unet_draws_what_the_eager_one_does_and_compiles_only_at_load(
    models_dir, tmp_path
):
    """The worker's GPU default, run here on the CPU: the UNet compiled at load for the warm
    size. Batches of that size (any batch size, any scheduler, an adapter fused into the
    weights at either weight) take the compiled graph, a size not warmed runs eagerly, and
    after the adapter the weights are the model's again. Every image is the uncompiled
    engine's (adapters as layers there), to within rounding, and no request compiles
    anything."""
    model = models_dir / "stable-diffusion"
    storage = Storage(str(tmp_path / "storage"))
    key = tenant_key(uuid.uuid4(), "adapters", "random.safetensors")
    storage.put(key, make_lora_adapter(model))
    adapted = {"lora": "random", "lora_key": key}
    torch._dynamo.reset()  # as in a fresh worker: no graph compiled by an earlier test
    before = graphs_compiled()
    jobs = [
        # integer timesteps (Euler's are floats). Not DDIM: on random weights its clipped
        # predictions turn rounding differences into another image, uncompiled too (NHWC).
        job(1).model_copy(update={"scheduler": "dpmpp_2m"}),
        job(2).model_copy(update={"width": 32, "height": 32}),  # not warmed
        job(3).model_copy(update=adapted),
        job(3).model_copy(update=adapted | {"lora_weight": 0.5}),
        job(3),  # the adapter's weights taken out again
        # a style: the IP-Adapter's layers on for its batch (eagerly), then off again
        job(3).model_copy(update={"style_image": reference(), "style_strength": 0.8}),
        job(3),
    ]
    engines = [
        DiffusionEngine("sd", model, device="cpu", max_batch_images=2, storage=storage),
        DiffusionEngine(
            "sd",
            model,
            device="cpu",
            max_batch_images=2,
            batch_window_seconds=2.0,
            storage=storage,
            warm_sizes=((64, 64),),
            compiled=True,
        ),
    ]
    eager, compiled = engines
    try:
        assert (compiled.compiled, compiled.channels_last) == (True, True)
        assert not eager.compiled and not eager.channels_last
        published = WorkerStatus(process="w", queue="sd", updated_at=0.0, **compiled.status())
        assert published.compiled is True  # operators see it in the worker's status
        at_load = graphs_compiled()
        assert at_load == before + 1  # at load, one graph for every batch size
        drawn = {}
        for name, engine in (("eager", eager), ("compiled", compiled)):
            pair = staggered(engine, 2, 0)  # seeds 0 and 1, one batch on the compiled engine
            singles = [engine.render(j, Sink()) for j in jobs]
            drawn[name] = [pixels(r.images[0]) for r in pair + singles]
        assert max(r.batch_images for r in pair) == 2
        assert compiled.adapters.fused is None  # the last job needed none
        assert graphs_compiled() == at_load  # nothing compiled for a request
    finally:
        for engine in engines:
            engine.close()
    for mine, theirs in zip(drawn["compiled"], drawn["eager"], strict=True):
        assert mine.shape == theirs.shape
        assert np.abs(mine - theirs).max() <= 1  # float rounding, not another image
    # the adapter did change the image, by its weight: applied, not skipped; so did the style
    plain, full, half = drawn["compiled"][6], drawn["compiled"][4], drawn["compiled"][5]
    assert np.abs(full - plain).mean() > np.abs(half - plain).mean() > 0.5
    assert np.abs(drawn["compiled"][7] - plain).mean() > 0.5
    assert np.array_equal(drawn["compiled"][8], plain)


def test_a_unet_that_fails_to_compile_runs_uncompiled(models_dir, no_compiler, caplog):
    """Where compiling fails at load (on a GPU host without a C compiler for Triton, say;
    here Inductor made to fail), the worker says so and serves the same images uncompiled."""
    model = models_dir / "stable-diffusion"
    failed = DiffusionEngine(
        "sd", model, device="cpu", max_batch_images=1, warm_sizes=((64, 64),), compiled=True
    )
    try:
        assert (failed.compiled, failed.channels_last) == (False, False)
        image = staggered(failed, 1, 0)[0]
    finally:
        failed.close()
    assert "compiling the UNet failed: it runs uncompiled" in caplog.text
    eager = DiffusionEngine("sd", model, device="cpu", max_batch_images=1)
    try:
        assert image.images == staggered(eager, 1, 0)[0].images
    finally:
        eager.close()
