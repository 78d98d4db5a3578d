"""OpenAI's image routes: POST /v1/images/generations and /v1/images/edits, and the files of
images answered as URLs. They run through the same image serving as /api/images."""

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from fastapi.responses import Response

from api.deps import InferenceKey, StateDep, TenantKey
from api.errors import OPENAI_ERRORS, BadRequest, OpenAIRoute
from api.inputs.json_body import json_body, openapi_body
from api.openai.objects import ImagesResponse
from api.openai.schemas import GenerationsRequest, parse_size
from api.sd.schemas import ImagesRequest
from api.sd.serving import ImageServing, openai_mask

router = APIRouter(tags=["images"], route_class=OpenAIRoute, responses=OPENAI_ERRORS)

GenerationsBody = Annotated[GenerationsRequest, Depends(json_body(GenerationsRequest))]


@router.post(
    "/v1/images/generations",
    openapi_extra=openapi_body(GenerationsRequest),
    response_model=ImagesResponse,
)
async def generations(
    owner: InferenceKey, body: GenerationsBody, state: StateDep, request: Request
) -> Response:
    return await ImageServing(state).openai(body.native(), body.response_format, owner, request)


async def _read(upload: UploadFile, field: str, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise BadRequest(f"{field}: file is larger than {limit} bytes", param=field)
    if not data:
        raise BadRequest(f"{field}: empty file", param=field)
    return data


@router.post("/v1/images/edits", response_model=ImagesResponse)
async def edits(
    owner: InferenceKey,
    state: StateDep,
    request: Request,
    image: UploadFile,
    prompt: Annotated[str, Form()],
    mask: UploadFile | None = None,
    n: Annotated[int, Form()] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[str, Form()] = "b64_json",
    model: Annotated[str | None, Form()] = None,
    style_image: UploadFile | None = None,
    style_strength: Annotated[float | None, Form()] = None,
) -> Response:
    """Inpainting where the mask is transparent; without a mask, image-to-image; with a
    `style_image` (not OpenAI's), in that image's style, `style_strength` strongly (0-1)."""
    if response_format not in ("b64_json", "url"):
        raise BadRequest("field 'response_format': b64_json or url", param="response_format")
    limit = state.settings.max_body_bytes
    picture = base64.b64encode(await _read(image, "image", limit)).decode()
    fields: dict = {"model": model, "prompt": prompt, "n": n, "image": picture}
    if mask is not None:
        data, max_pixels = await _read(mask, "mask", limit), state.settings.max_image_pixels
        fields["mask"] = await state.decoder.run(owner, True, openai_mask, data, "mask", max_pixels)
    if style_image is not None:
        style = await _read(style_image, "style_image", limit)
        fields["style_image"] = base64.b64encode(style).decode()
    if style_strength is not None:
        fields["style_strength"] = style_strength
    if size is not None:
        fields["width"], fields["height"] = parse_size(size)
    try:
        body = ImagesRequest(**fields)
    except ValueError as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    return await ImageServing(state).openai(body, response_format, owner, request)


@router.get("/v1/images/files/{token}", name="image_file")
async def image_file(token: str, owner: TenantKey, state: StateDep) -> Response:
    """An image produced with response_format=url: its own tenant only, until it expires."""
    return await ImageServing(state).file(token, owner)
