"""A chat image larger than the model sees is reduced at the gateway, as the model's processor
would first make it: the model sees the very same pixels; the job carries a fraction."""

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter
from transformers import AutoProcessor

from api.inputs.image_checks import check_image
from harness.helpers import auth
from workers.keyspace import job_record_key


def picture(width: int, height: int, mode: str = "RGB") -> str:
    noise = np.random.default_rng(7).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(processor, b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return processor.image_processor(images=image, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize(
    "size, mode", [((1700, 1200), "RGB"), ((900, 2000), "L"), ((500, 400), "P")]
)
def test_the_model_sees_the_same_pixels_from_the_reduced_image(models_dir, size, mode):
    processor = AutoProcessor.from_pretrained(models_dir / "llava-llama3")
    original = picture(*size, mode)
    kept = check_image(original, "image", 4096 * 4096, side=336)
    assert min(Image.open(io.BytesIO(base64.b64decode(kept))).size) == 336
    np.testing.assert_array_equal(pixels(processor, kept), pixels(processor, original))


def test_an_image_no_larger_goes_as_it_came():
    small = picture(300, 200)
    assert check_image(small, "image", 4096 * 4096, side=336) == small
    assert check_image("data:image/png;base64," + small, "image", 4096 * 4096, 336) == small


def test_a_queued_job_carries_the_reduced_image(gateway, tenant_factory, redis_client):
    """An async job with a 4096 x 4096 picture: its record (in Redis, then the broker's
    message) holds a 336-pixel one."""
    _, key, _ = tenant_factory.create("free")
    big = picture(4096, 3072)
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{big}"}},
        ],
    }
    body = {"type": "chat", "input": {"model": "llava-llama3", "messages": [message]}}
    made = httpx.post(f"{gateway.url}/v1/jobs", json=body, headers=auth(key), timeout=120)
    assert made.status_code in (200, 202), made.text
    job_id = made.json()["id"]
    spec = json.loads(redis_client.hget(job_record_key(job_id), "spec"))
    [carried] = spec["messages"][0]["images"]
    assert Image.open(io.BytesIO(base64.b64decode(carried))).size == (448, 336)
    assert len(carried) < len(big) / 10
    httpx.post(f"{gateway.url}/v1/jobs/{job_id}/cancel", headers=auth(key), timeout=30)
