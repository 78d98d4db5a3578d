"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models."""

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api.deps import InferenceKey, StateDep, TenantKey
from api.errors import OPENAI_ERRORS, NotFound, OpenAIRoute
from api.inputs.json_body import json_body, openapi_body
from api.inputs.wire import list_page
from api.openai.objects import ChatCompletion, Completion, Model, Page
from api.openai.schemas import ChatCompletionRequest, CompletionRequest
from api.openai.serving import OpenAIServing

router = APIRouter(tags=["openai"], route_class=OpenAIRoute, responses=OPENAI_ERRORS)

ChatBody = Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))]
STARTED = int(time.time())


@router.post(
    "/v1/chat/completions",
    openapi_extra=openapi_body(ChatCompletionRequest),
    response_model=ChatCompletion,
)
async def chat_completions(
    owner: InferenceKey, body: ChatBody, state: StateDep, request: Request
) -> Response:
    return await OpenAIServing(state).chat(body, owner, request)


CompletionBody = Annotated[CompletionRequest, Depends(json_body(CompletionRequest))]


@router.post(
    "/v1/completions", openapi_extra=openapi_body(CompletionRequest), response_model=Completion
)
async def completions(
    owner: InferenceKey, body: CompletionBody, state: StateDep, request: Request
) -> Response:
    return await OpenAIServing(state).completion(body, owner, request)


def _hosted(state) -> list[dict]:
    """Every model this service hosts, with its kind (`chat`: /v1/chat/completions; `image`:
    /v1/images/*), an extra field OpenAI's clients ignore."""
    settings = state.settings
    hosted = ((settings.llava_model, "chat"), (settings.sd_model, "image"))
    return [
        {"id": name, "object": "model", "created": STARTED, "owned_by": "gpuhost", "kind": kind}
        for name, kind in hosted
    ]


@router.get("/v1/models", response_model=Page[Model])
async def models(_: TenantKey, state: StateDep) -> dict:
    return list_page(_hosted(state))


@router.get("/v1/models/{model}", response_model=Model)
async def model(model: str, _: TenantKey, state: StateDep) -> dict:
    for hosted in _hosted(state):
        if model in (hosted["id"], f"{hosted['id']}:latest"):
            return hosted
    raise NotFound(f"The model '{model}' does not exist", param="model")
