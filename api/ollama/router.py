"""Ollama's HTTP routes. The router only parses and picks the response; serving does the rest."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api.deps import InferenceKey, StateDep, TenantKey
from api.errors import OLLAMA_ERRORS, NotFound, OllamaRoute
from api.inputs.json_body import json_body, openapi_body
from api.ollama import catalog
from api.ollama.schemas import ChatRequest, GenerateRequest, ShowRequest
from api.ollama.serving import OllamaServing

router = APIRouter(tags=["ollama"], route_class=OllamaRoute, responses=OLLAMA_ERRORS)

ChatBody = Annotated[ChatRequest, Depends(json_body(ChatRequest))]
GenerateBody = Annotated[GenerateRequest, Depends(json_body(GenerateRequest))]
ShowBody = Annotated[ShowRequest, Depends(json_body(ShowRequest))]
VERSION = "0.1.0"


@router.post("/api/chat", openapi_extra=openapi_body(ChatRequest))
async def chat(owner: InferenceKey, body: ChatBody, state: StateDep, request: Request) -> Response:
    return await OllamaServing(state).respond(body, owner, request)


@router.post("/api/generate", openapi_extra=openapi_body(GenerateRequest))
async def generate(
    owner: InferenceKey, body: GenerateBody, state: StateDep, request: Request
) -> Response:
    return await OllamaServing(state).respond(body, owner, request)


@router.get("/api/tags")
async def tags(_: TenantKey, state: StateDep) -> dict:
    """The models this service offers."""
    return await catalog.tags(state)


@router.get("/api/ps")
async def running(_: TenantKey, state: StateDep) -> dict:
    """The models workers have loaded now, and until when."""
    return await catalog.running(state)


@router.post("/api/show", openapi_extra=openapi_body(ShowRequest))
async def show(_: TenantKey, body: ShowBody, state: StateDep) -> dict:
    name = body.model_name()
    if not state.serves(name):
        raise NotFound(f"model '{name}' not found")
    return await catalog.show(state, name)


@router.get("/api/version")
async def version() -> dict:
    return {"version": VERSION}
