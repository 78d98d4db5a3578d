"""Ollama's HTTP routes. The router only parses and picks the response; serving does the rest."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api.body import json_body
from api.deps import InferenceKey, StateDep
from api.ollama.schemas import ChatRequest, GenerateRequest
from api.ollama.serving import OllamaServing

router = APIRouter(tags=["ollama"])

ChatBody = Annotated[ChatRequest, Depends(json_body(ChatRequest))]
GenerateBody = Annotated[GenerateRequest, Depends(json_body(GenerateRequest))]


def _schema(model) -> dict:
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.post("/api/chat", openapi_extra=_schema(ChatRequest))
async def chat(owner: InferenceKey, body: ChatBody, state: StateDep, request: Request) -> Response:
    return await OllamaServing(state).respond(body, owner, request)


@router.post("/api/generate", openapi_extra=_schema(GenerateRequest))
async def generate(
    owner: InferenceKey, body: GenerateBody, state: StateDep, request: Request
) -> Response:
    return await OllamaServing(state).respond(body, owner, request)
