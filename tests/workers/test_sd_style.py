"""Style from a reference image in the Stable Diffusion engine: the tiny model's IP-Adapter
(made by `workers.tiny`) applied per batch, combined with the other modes and LoRA."""

import base64
import io
import shutil
import threading
import uuid

import numpy as np
import pytest
from PIL import Image

from storage import Storage, tenant_key
from tests.workers.test_sd_engine import Sink, job, pixels, reference
from workers.engines.base import InvalidRequest
from workers.engines.diffusion import DiffusionEngine
from workers.engines.sd_style import FOLDER
from workers.tiny import make_lora_adapter


def styled(seed: int, color: str, strength: float = 0.8, **extra):
    update = {"style_image": reference(color), "style_strength": strength, "steps": 8}
    return job(seed).model_copy(update=update | extra)


def drawn(engine: DiffusionEngine, spec) -> np.ndarray:
    return pixels(engine.render(spec, Sink()).images[0])


def together(engine: DiffusionEngine, specs: list) -> list:
    results = [None] * len(specs)

    def one(i: int) -> None:
        results[i] = engine.render(specs[i], Sink())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.fixture(scope="module")
def engine(models_dir, tmp_path_factory):
    storage = Storage(str(tmp_path_factory.mktemp("storage")))
    engine = DiffusionEngine(
        "sd",
        models_dir / "stable-diffusion",
        device="cpu",
        max_batch_images=4,
        batch_window_seconds=1.0,
        storage=storage,
    )
    yield engine
    engine.close()


def test_a_reference_image_styles_the_image_by_its_strength(engine):
    plain = drawn(engine, job(1).model_copy(update={"steps": 8}))
    unprocessed = dict(engine.pipelines["txt2img"].unet.attn_processors)
    red, blue = drawn(engine, styled(1, "red")), drawn(engine, styled(1, "blue"))
    weak, none = drawn(engine, styled(1, "red", 0.3)), drawn(engine, styled(1, "red", 0.0))
    # the style changed the image, the more the stronger, and another style another way
    assert np.abs(red - plain).mean() > np.abs(weak - plain).mean() > 0.5
    assert np.abs(red - blue).mean() > 0.5
    assert np.abs(none - plain).max() <= 1  # at strength 0, no style at all
    # the adapter came off again: the UNet's own attention, and the same image as before
    assert engine.pipelines["txt2img"].unet.attn_processors == unprocessed
    assert engine.pipelines["txt2img"].unet.encoder_hid_proj is None
    assert np.array_equal(drawn(engine, job(1).model_copy(update={"steps": 8})), plain)


def test_the_same_seed_and_style_give_the_same_image_alone_or_batched(engine):
    specs = [styled(seed, color) for seed, color in ((1, "red"), (2, "blue"), (3, "red"))]
    alone = [drawn(engine, spec) for spec in specs]
    batched = together(engine, specs)
    assert [r.batch_images for r in batched] == [3, 3, 3]
    for mine, theirs in zip(alone, batched, strict=True):
        assert np.abs(mine - pixels(theirs.images[0])).max() <= 2  # rounding, not another image
    # a batch holds one strength: another strength runs in a batch of its own
    mixed = together(engine, [styled(1, "red"), styled(2, "red", 0.5)])
    assert [r.batch_images for r in mixed] == [1, 1]


def test_a_style_combines_with_image_to_image_inpainting_and_lora(engine, models_dir):
    key = tenant_key(uuid.uuid4(), "adapters", "random.safetensors")
    engine.adapters.storage.put(key, make_lora_adapter(models_dir / "stable-diffusion"))
    content = reference("green")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    modes = {
        "img2img": {"kind": "img2img", "image": content, "strength": 0.9},
        "inpaint": {
            "kind": "inpaint",
            "image": content,
            "mask": base64.b64encode(buffer.getvalue()).decode(),
        },
        "lora": {"lora": "random", "lora_key": key},
    }
    for name, fields in modes.items():
        without = drawn(engine, job(4).model_copy(update={"steps": 8} | fields))
        with_style = drawn(engine, styled(4, "red", **fields))
        assert without.shape == with_style.shape == (64, 64, 3), name
        assert np.abs(with_style - without).mean() > 0.5, name


def test_a_model_without_an_ip_adapter_refuses_a_style_naming_the_field(models_dir, tmp_path):
    bare = tmp_path / "sd-without-ip-adapter"
    shutil.copytree(models_dir / "stable-diffusion", bare, ignore=shutil.ignore_patterns(FOLDER))
    engine = DiffusionEngine("bare-sd", bare, device="cpu")
    try:
        assert engine.style is None
        with pytest.raises(InvalidRequest, match="field 'style_image': model 'bare-sd' has no"):
            engine.render(styled(1, "red"), Sink())
        assert engine.render(job(1), Sink()).images  # the rest still works
    finally:
        engine.close()
