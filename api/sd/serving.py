"""Runs image requests through the job path (api.pipeline) and shapes their answers."""

import base64
import io
import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from api.errors import ApiError, BadRequest, NotFound
from api.inputs.image_checks import decoded
from api.inputs.wire import NS, new_request_id, timestamp
from api.pipeline.stream import Chunk
from api.pipeline.submit import complete, streamed, submit
from api.sd.schemas import ImageLimits, ImagesRequest
from api.state import AppState
from billing.tenants import KeyOwner
from tuning import service as tuning
from workers.contract import ImageJob, ImagesChunk, ProgressChunk
from workers.keyspace import image_file_key

NDJSON = "application/x-ndjson"


class ImageServing:
    def __init__(self, state: AppState):
        self.state = state

    def model(self, requested: str | None) -> str:
        name = self.state.settings.sd_model
        if requested not in (None, name, f"{name}:latest"):
            raise NotFound(f"model '{requested}' not found; available: {name}", param="model")
        return name

    def _limits(self, tier: str) -> ImageLimits:
        s = self.state.settings
        return ImageLimits(
            max_side=s.sd_max_side,
            max_input_pixels=s.max_image_pixels,
            max_n=s.sd_images_per_request.get(tier, 1),
            default_side=s.sd_default_side,
        )

    async def job(self, body: ImagesRequest, owner: KeyOwner, request_id: str) -> ImageJob:
        """The worker's job for `body`; its adapter, if any, must be this tenant's and made
        for this model."""
        model = self.model(body.model)
        lora_key = None
        if body.lora is not None:
            # A session of its own, not the request's: an image request runs for seconds to
            # minutes and must not hold a database connection meanwhile.
            async with self.state.sessions() as session:
                adapter = await tuning.get_adapter(session, owner.tenant_id, body.lora)
            if adapter is None:
                raise NotFound(f"field 'lora': adapter '{body.lora}' not found", param="lora")
            if adapter.model != model:
                raise BadRequest(
                    f"field 'lora': adapter '{body.lora}' was trained for '{adapter.model}', "
                    f"not '{model}'",
                    param="lora",
                )
            lora_key = adapter.key
        limits = self._limits(owner.tier)
        images = any(i is not None for i in (body.image, body.mask, body.style_image))
        return await self.state.decoder.run(
            owner, images, body.to_job, owner, request_id, model, limits, lora_key
        )

    async def run(
        self, body: ImagesRequest, owner: KeyOwner, request: Request
    ) -> tuple[ImagesChunk, dict[str, str], float]:
        """Run to completion: (final chunk, the answer's headers, start time)."""
        started = time.time()
        spec = await self.job(body, owner, new_request_id())
        job = await submit(self.state, spec, owner, "images", request)
        _, final = await complete(job, request)
        return final, job.headers, started

    async def native(self, body: ImagesRequest, owner: KeyOwner, request: Request) -> Response:
        if body.stream:
            return await self._native_stream(body, owner, request)
        final, headers, started = await self.run(body, owner, request)
        return JSONResponse(native_result(body, final, started), headers=headers)

    async def _native_stream(self, body: ImagesRequest, owner: KeyOwner, request: Request):
        started = time.time()
        spec = await self.job(body, owner, new_request_id())
        job = await submit(self.state, spec, owner, "images", request)

        async def lines(chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    if isinstance(chunk, ProgressChunk):
                        yield (
                            json.dumps({"step": chunk.step, "steps": chunk.steps, "done": False})
                            + "\n"
                        )
                    elif isinstance(chunk, ImagesChunk):
                        yield json.dumps(native_result(body, chunk, started)) + "\n"
                    else:
                        yield json.dumps({"error": chunk.message}) + "\n"
            except ApiError as exc:
                yield json.dumps({"error": exc.message}) + "\n"

        return await streamed(job, request, lines, NDJSON, job.headers)

    async def openai(
        self, body: ImagesRequest, response_format: str, owner: KeyOwner, request: Request
    ) -> Response:
        final, headers, _ = await self.run(body, owner, request)
        if response_format == "url":
            data = [{"url": await self._store(png, owner, request)} for png in final.images]
        else:
            data = [{"b64_json": png} for png in final.images]
        return JSONResponse(openai_images(int(time.time()), data, final), headers=headers)

    async def _store(self, png: str, owner: KeyOwner, request: Request) -> str:
        token = secrets.token_urlsafe(24)
        ttl = self.state.settings.image_url_ttl_seconds
        value = json.dumps({"tenant_id": str(owner.tenant_id), "png": png})
        await self.state.redis.set(image_file_key(token), value, ex=ttl)
        base = self.state.settings.public_base_url.rstrip("/")
        if base:
            return f"{base}{request.app.url_path_for('image_file', token=token)}"
        return str(request.url_for("image_file", token=token))

    async def file(self, token: str, owner: KeyOwner) -> Response:
        raw = await self.state.redis.get(image_file_key(token))
        stored = json.loads(raw) if raw else None
        if stored is None or stored["tenant_id"] != str(owner.tenant_id):
            raise NotFound("image not found (unknown, someone else's, or expired)")
        return Response(base64.b64decode(stored["png"]), media_type="image/png")


def openai_images(created: int, data: list[dict], final: ImagesChunk) -> dict:
    """OpenAI's images response; what the images cost in GPU-seconds beside them (OpenAI's
    `usage` counts tokens, which these models do not bill by)."""
    return {"created": created, "data": data, "gpu_seconds": round(final.gpu_seconds, 3)}


def native_result(body: ImagesRequest, final: ImagesChunk, started: float) -> dict:
    return {
        "model": body.model or "stable-diffusion",
        "created_at": timestamp(),
        "images": final.images,
        "seed": final.seed,
        "gpu_seconds": round(final.gpu_seconds, 3),
        "total_duration": int((time.time() - started) * NS),
        "load_duration": int(final.load_seconds * NS),
        "queue_duration": int(final.queue_seconds * NS),
        "run_duration": int(final.run_seconds * NS),
        "batch_images": final.batch_images,
        "done": True,
    }


def openai_mask(data: bytes, field: str, max_pixels: int) -> str:
    """OpenAI masks mark the area to edit as transparent; ours mark it white. Decodes: run it
    through the Decoder."""
    mask = decoded(data, field, max_pixels)
    if "A" not in mask.getbands():
        raise BadRequest(
            f"{field}: the mask must have transparency (an alpha channel)", param=field
        )
    edit = mask.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
    buffer = io.BytesIO()
    edit.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()
