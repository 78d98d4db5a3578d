"""The native image route: POST /api/images (OpenAI's /v1/images/* are in api/openai/images.py)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api.deps import InferenceKey, StateDep
from api.errors import OLLAMA_ERRORS, OllamaRoute
from api.inputs.json_body import json_body, openapi_body
from api.sd.schemas import ImagesRequest
from api.sd.serving import ImageServing

router = APIRouter(tags=["images"], route_class=OllamaRoute, responses=OLLAMA_ERRORS)

ImagesBody = Annotated[ImagesRequest, Depends(json_body(ImagesRequest))]


@router.post("/api/images", openapi_extra=openapi_body(ImagesRequest))
async def images(
    owner: InferenceKey, body: ImagesBody, state: StateDep, request: Request
) -> Response:
    return await ImageServing(state).native(body, owner, request)
