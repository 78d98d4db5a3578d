"""Stable Diffusion end to end: gateway -> Celery `sd` worker (tiny SD on the CPU)."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from harness.helpers import auth, idle_status, in_flight, png_bomb, usage_rows, worker_statuses
from harness.processes import wait_for

pytestmark = pytest.mark.usefixtures("sd_worker")

SMALL = {"width": 64, "height": 64, "num_inference_steps": 3}


def images(gateway, key, timeout=120, **body) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/api/images",
        json={"prompt": "a red fox", **SMALL, **body},
        headers=auth(key),
        timeout=timeout,
    )


def sd_status(redis_client):
    [status] = [s for s in worker_statuses(redis_client) if s.queue == "sd"]
    return status


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    assert image.format == "PNG"
    return image


def picture(width: int, height: int, color="blue", mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class TestModes:
    def test_text_to_image_returns_pngs_of_the_requested_size(
        self, gateway, tenant_factory, sessions
    ):
        _, key, _ = tenant_factory.create("pro")
        response = images(gateway, key, width=96, height=64, n=2, seed=3)
        assert response.status_code == 200, response.text
        result = response.json()
        assert [decode(b).size for b in result["images"]] == [(96, 64), (96, 64)]
        assert result["seed"] == 3 and result["gpu_seconds"] > 0
        [record] = usage_rows(sessions, response.headers["x-request-id"])
        assert record.kind == "txt2img" and record.output_tokens == 2
        assert record.gpu_seconds == pytest.approx(result["gpu_seconds"], abs=1e-6)

    def test_image_to_image_takes_the_size_of_the_image(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        body = {"image": picture(88, 72), "strength": 0.6, "width": None, "height": None}
        response = images(gateway, key, **body)
        assert response.status_code == 200, response.text
        assert decode(response.json()["images"][0]).size == (88, 72)

    def test_inpainting(self, gateway, tenant_factory, sessions):
        _, key, _ = tenant_factory.create("free")
        response = images(gateway, key, image=picture(64, 64), mask=picture(64, 64, "white", "L"))
        assert response.status_code == 200, response.text
        assert decode(response.json()["images"][0]).size == (64, 64)
        [record] = usage_rows(sessions, response.headers["x-request-id"])
        assert record.kind == "inpaint"

    @pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
    def test_schedulers_by_name(self, gateway, tenant_factory, scheduler):
        _, key, _ = tenant_factory.create("free")
        assert images(gateway, key, scheduler=scheduler).status_code == 200

    def test_progress_is_streamed(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        with httpx.stream(
            "POST",
            f"{gateway.url}/api/images",
            headers=auth(key),
            timeout=120,
            json={"prompt": "fox", **SMALL, "stream": True},
        ) as response:
            lines = [line for line in response.iter_lines() if line]
        import json

        chunks = [json.loads(line) for line in lines]
        assert [c["step"] for c in chunks[:-1]] == [1, 2, 3]
        assert chunks[-1]["done"] is True and len(chunks[-1]["images"]) == 1


class TestSeeds:
    def test_same_seed_same_image_different_seed_different(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        first = images(gateway, key, seed=42).json()["images"][0]
        again = images(gateway, key, seed=42).json()["images"][0]
        other = images(gateway, key, seed=43).json()["images"][0]
        assert first == again
        assert first != other


class TestBatching:
    def test_waiting_requests_of_one_shape_run_as_one_batch_and_bills_add_up(
        self, gateway, tenant_factory, redis_client, sessions
    ):
        keys = [tenant_factory.create("pro")[1] for _ in range(4)]
        before = idle_status(redis_client, after=time.time(), queue="sd")
        with ThreadPoolExecutor(4) as pool:
            # A long request keeps the engine busy while three of one shape queue behind it.
            blocker = pool.submit(
                images, gateway, keys[0], num_inference_steps=60, width=128, height=128
            )
            wait_for(lambda: sd_status(redis_client).active >= 1, 30, "the blocker to run")
            followers = [
                pool.submit(images, gateway, key, seed=i) for i, key in enumerate(keys[1:])
            ]
            responses = [blocker.result()] + [f.result() for f in followers]
        after = idle_status(redis_client, after=time.time(), queue="sd")
        assert [r.status_code for r in responses] == [200] * 4
        assert [r.json()["batch_images"] for r in responses[1:]] == [3, 3, 3]
        records = [usage_rows(sessions, r.headers["x-request-id"])[0] for r in responses]
        busy = after.busy_seconds - before.busy_seconds
        assert sum(r.gpu_seconds for r in records) == pytest.approx(busy, rel=0.01)
        # The followers shared one batch: each paid a third of it, less than the batch's run time.
        for response in responses[1:]:
            result = response.json()
            assert result["gpu_seconds"] < result["run_duration"] / 1e9


BAD = {
    "not an image": (
        {"image": base64.b64encode(b"plain text").decode()},
        400,
        "image: not an image",
    ),
    "truncated": (
        {"image": base64.b64encode(base64.b64decode(picture(96, 96, "red"))[:70]).decode()},
        400,
        "image: corrupt or truncated image",
    ),
    "bomb": ({"image": png_bomb(30000)}, 413, "image"),
    "mask size": (
        {"image": picture(64, 64), "mask": picture(72, 64, "white", "L")},
        400,
        "mask is 72x64 but the image is 64x64",
    ),
    "mask alone": ({"mask": picture(64, 64, "white", "L")}, 400, "inpainting needs an 'image'"),
    "size not multiple of 8": ({"width": 100}, 400, "field 'width'"),
    "too large": ({"width": 4096, "height": 64}, 400, "over the limit of 1024"),
    "steps": ({"num_inference_steps": 0}, 400, "field 'num_inference_steps'"),
    "guidance NaN": (None, 400, "field 'guidance_scale'"),
    "strength": ({"strength": 0}, 400, "field 'strength'"),
    "scheduler": ({"scheduler": "magic"}, 400, "field 'scheduler'"),
    "n over the tier": ({"n": 2}, 400, "the free tier allows at most 1"),
    "style image not an image": ({"style_image": "aGVsbG8="}, 400, "style_image: not an image"),
    "style strength": ({"style_image": picture(8, 8), "style_strength": 2}, 400, "style_strength"),
    "unknown model": ({"model": "dall-e-9"}, 404, "model 'dall-e-9' not found"),
}


class TestBadInput:
    @pytest.mark.parametrize("case", BAD, ids=list(BAD))
    def test_clear_error_and_no_slot_held(self, gateway, tenant_factory, redis_client, case):
        tenant_id, key, _ = tenant_factory.create("free")
        fields, status, message = BAD[case]
        if fields is None:
            response = httpx.post(
                f"{gateway.url}/api/images",
                headers=auth(key),
                timeout=30,
                content=b'{"prompt": "x", "guidance_scale": NaN}',
            )
        else:
            response = images(gateway, key, **fields)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
        assert in_flight(redis_client, tenant_id) == 0

    def test_an_unknown_lora_adapter_is_refused_at_the_door(
        self, gateway, tenant_factory, redis_client
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        response = images(gateway, key, lora="my-style")
        assert response.status_code == 404
        assert "field 'lora': adapter 'my-style' not found" in response.json()["error"]
        assert in_flight(redis_client, tenant_id) == 0  # nothing was held or queued


class TestStyle:
    """Style from a reference image (the tiny model's IP-Adapter), by `style_strength`."""

    def test_a_reference_image_styles_the_image_and_is_metered(
        self, gateway, tenant_factory, sessions
    ):
        _, key, _ = tenant_factory.create("pro")
        reference = picture(48, 48, "red")

        def drawn(**fields) -> tuple[np.ndarray, httpx.Response]:
            response = images(gateway, key, seed=11, **fields)
            assert response.status_code == 200, response.text
            return np.asarray(decode(response.json()["images"][0]), dtype=np.int16), response

        plain, _ = drawn()
        strong, response = drawn(style_image=reference, style_strength=1.0)
        unstyled, _ = drawn(style_image=reference, style_strength=0.0)
        assert np.abs(strong - plain).mean() > 0.5  # the style changed the image
        assert np.abs(unstyled - plain).max() <= 1  # at strength 0 it changes nothing
        [record] = usage_rows(sessions, response.headers["x-request-id"])
        assert record.status == "completed" and record.gpu_seconds > 0
        assert record.gpu_seconds == pytest.approx(response.json()["gpu_seconds"], abs=1e-6)

    def test_openai_edits_take_a_style_image_as_a_multipart_field(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        content = ("in.png", base64.b64decode(picture(64, 64, "green")), "image/png")

        def edit(style: bytes) -> httpx.Response:
            return httpx.post(
                f"{gateway.url}/v1/images/edits",
                headers=auth(key),
                files={"image": content, "style_image": ("style.png", style, "image/png")},
                data={"prompt": "a lighthouse", "size": "64x64", "style_strength": "0.7"},
                timeout=120,
            )

        answered = edit(base64.b64decode(picture(48, 48, "red")))
        assert answered.status_code == 200, answered.text
        assert decode(answered.json()["data"][0]["b64_json"]).size == (64, 64)
        refused = edit(b"not a picture")
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "style_image"


class TestOpenAIImages:
    def client(self, gateway, key):
        return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=120)

    def test_generations_as_base64(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        result = self.client(gateway, key).images.generate(
            prompt="a lighthouse", n=2, size="64x64", response_format="b64_json"
        )
        assert [decode(d.b64_json).size for d in result.data] == [(64, 64), (64, 64)]

    def test_generations_as_urls_for_their_tenant_only(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        _, stranger, _ = tenant_factory.create("free")
        result = self.client(gateway, key).images.generate(
            prompt="a lighthouse", size="64x64", response_format="url"
        )
        url = result.data[0].url
        mine = httpx.get(url, headers=auth(key), timeout=30)
        assert mine.status_code == 200 and mine.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(mine.content)).size == (64, 64)
        assert httpx.get(url, headers=auth(stranger), timeout=30).status_code == 404
        assert httpx.get(url, timeout=30).status_code == 401

    def test_edits_inpaint_where_the_mask_is_transparent(self, gateway, tenant_factory, sessions):
        _, key, _ = tenant_factory.create("free")
        image = base64.b64decode(picture(64, 64))
        buffer = io.BytesIO()
        mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
        mask.save(buffer, "PNG")
        result = self.client(gateway, key).images.edit(
            image=("in.png", image, "image/png"),
            mask=("mask.png", buffer.getvalue(), "image/png"),
            prompt="a window",
            size="64x64",
        )
        assert decode(result.data[0].b64_json).size == (64, 64)

    def test_a_bad_size_is_a_bad_request_naming_size(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        with pytest.raises(openai.BadRequestError) as caught:
            self.client(gateway, key).images.generate(prompt="x", size="100x100")
        assert caught.value.body["param"] == "size"
