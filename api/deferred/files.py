"""Files (`/v1/files`), as OpenAI's Files API has them, for the official clients: upload
(multipart `file` and `purpose`: `batch`, `fine-tune` or `user_data`; `expires_after`), list,
retrieve, read back (`/content`), delete.

An upload streams from the request's spooled file to storage a MiB at a time (never whole in
memory), up to GPUHOST_MAX_UPLOAD_BYTES, and is kept only if the tenant's files fit its plan's
`file_bytes` with it. Every file expires GPUHOST_FILE_RETENTION_SECONDS after it was made at
the latest (0: kept until deleted), sooner if the upload's `expires_after` says so. Another
tenant's file id is a 404, as is an expired one. The rows and their queries:
`billing.files`.
"""

import logging
from datetime import UTC, datetime
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import InferenceKey, SessionDep, StateDep
from api.errors import OPENAI_ERRORS, BadRequest, Forbidden, NotFound, OpenAIRoute, PayloadTooLarge
from api.inputs.wire import list_page
from api.openai.objects import FileDeleted, FileObject, Page
from api.state import AppState
from billing import files as stored_files
from billing.files import PURPOSES, SWEEP_BATCH, OverQuota, StoredFile
from billing.tenants import KeyOwner
from config.plans import Plan
from storage import TooLarge, file_key

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/v1/files", tags=["files"], route_class=OpenAIRoute, responses=OPENAI_ERRORS
)
READ_CHUNK = 1024 * 1024
# OpenAI's bounds on `expires_after[seconds]`: an hour to 30 days.
EXPIRES_MIN, EXPIRES_MAX = 3600, 30 * 24 * 3600


def file_view(stored: StoredFile) -> dict:
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.bytes,
        "created_at": int(stored.created_at.timestamp()),
        "expires_at": int(stored.expires_at.timestamp()) if stored.expires_at else None,
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "status_details": None,
    }


def _size(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB" if size >= 1024 * 1024 else f"{size:,} bytes"


def _plan_of(state: AppState):
    def plan_of(tier: str) -> Plan:
        plan = state.settings.plans.get(tier)
        if plan is None:
            raise Forbidden(f"tier '{tier}' has no plan on this server")
        return plan

    return plan_of


async def keep_upload(
    state: AppState, owner: KeyOwner, file: UploadFile, purpose: str, seconds: int | None = None
) -> StoredFile:
    """Keep an upload as the tenant's file (413 past the largest upload or the plan's bytes,
    nothing kept then); it expires after `seconds` if given, the operator's limit at most."""
    filename = (file.filename or "").strip()
    if not filename:
        raise BadRequest("field 'file': the upload has no file name", param="file")
    now = datetime.now(UTC)
    made = StoredFile(
        id=stored_files.new_file_id(),
        tenant_id=owner.tenant_id,
        purpose=purpose,
        filename=filename[:255],
        created_at=now,
        expires_at=stored_files.expiry(now, seconds, state.settings.file_retention_seconds),
    )
    made.storage_key = file_key(owner.tenant_id, made.id)
    limit = state.settings.max_upload_bytes
    try:  # from the spooled upload to storage, a MiB at a time, off the event loop
        made.bytes = await anyio.to_thread.run_sync(
            state.storage.put_file, made.storage_key, file.file, limit
        )
    except TooLarge:
        raise PayloadTooLarge(
            f"field 'file': over {_size(limit)}, the largest upload this server takes",
            param="file",
        ) from None
    try:
        await stored_files.add(state.sessions, made, _plan_of(state), now)
    except BaseException as exc:  # not kept: nor are its bytes, even on a cancelled request
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(state.storage.delete, made.storage_key)
        if isinstance(exc, OverQuota):
            raise PayloadTooLarge(
                f"the {exc.plan.name} plan keeps {_size(exc.plan.file_bytes)} of files; "
                f"{_size(exc.used)} are kept and this file is {_size(made.bytes)}: delete some "
                "(DELETE /v1/files/{id})",
                param="file",
            ) from None
        raise
    return made


@router.post("", response_model=FileObject)
async def create(
    owner: InferenceKey,
    state: StateDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
) -> dict:
    """Keep a file for later requests (a batch's input, a fine-tune's dataset)."""
    if purpose not in PURPOSES:
        raise BadRequest(
            f"field 'purpose': '{purpose}' is not one of {', '.join(PURPOSES)}", param="purpose"
        )
    if (anchor is None) != (seconds is None) or anchor not in (None, "created_at"):
        raise BadRequest(
            "field 'expires_after': give both 'anchor' (created_at) and 'seconds'",
            param="expires_after",
        )
    if seconds is not None and not EXPIRES_MIN <= seconds <= EXPIRES_MAX:
        raise BadRequest(
            f"field 'expires_after.seconds': {seconds} is not within {EXPIRES_MIN} (an hour) "
            f"and {EXPIRES_MAX} (30 days)",
            param="expires_after",
        )
    made = await keep_upload(state, owner, file, purpose, seconds)
    return file_view(made)


@router.get("", response_model=Page[FileObject])
async def list_files(
    owner: InferenceKey,
    session: SessionDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    """The tenant's files by creation time (newest first unless `order=asc`), `limit` at a
    time; the next page starts `after` the last id of this one."""
    mark = None
    if after is not None:
        mark = await stored_files.find(session, owner.tenant_id, after)
        if mark is None:
            raise NotFound(f"field 'after': no file '{after}'", param="after")
    found = await stored_files.page(
        session, owner.tenant_id, purpose, limit, mark, ascending=order == "asc"
    )
    return list_page([file_view(stored) for stored in found.files], found.has_more)


async def file_for(state: AppState, owner: KeyOwner, file_id: str, purpose: str, field: str):
    """The tenant's file `file_id`, named in the request's `field` for a use that takes files
    of `purpose`: 404 if it is not the tenant's (or expired), 400 if it is for another use."""
    async with state.sessions() as session:
        stored = await stored_files.find(session, owner.tenant_id, file_id)
    if stored is None:
        raise NotFound(f"no file '{file_id}'", param=field)
    if stored.purpose != purpose:
        raise BadRequest(
            f"field '{field}': file '{file_id}' is for {stored.purpose}, not {purpose}",
            param=field,
        )
    return stored


async def _found(session, owner, file_id: str) -> StoredFile:
    stored = await stored_files.find(session, owner.tenant_id, file_id)
    if stored is None:
        raise NotFound(f"no file '{file_id}'")
    return stored


@router.get("/{file_id}", response_model=FileObject)
async def retrieve(file_id: str, owner: InferenceKey, session: SessionDep) -> dict:
    return file_view(await _found(session, owner, file_id))


@router.get("/{file_id}/content")
async def content(
    file_id: str, owner: InferenceKey, session: SessionDep, state: StateDep
) -> StreamingResponse:
    """The file's bytes as uploaded (or as the service wrote them), read a MiB at a time."""
    stored = await _found(session, owner, file_id)
    try:
        source = await anyio.to_thread.run_sync(state.storage.open, stored.storage_key)
    except FileNotFoundError:
        raise NotFound(f"no file '{file_id}'") from None  # deleted meanwhile

    async def chunks():
        try:
            while chunk := await anyio.to_thread.run_sync(source.read, READ_CHUNK):
                yield chunk
        finally:
            await anyio.to_thread.run_sync(source.close)

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(stored.bytes)},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
async def delete(file_id: str, owner: InferenceKey, state: StateDep) -> dict:
    async with state.sessions() as session:
        stored = await _found(session, owner, file_id)
    await remove(state, stored)
    return {"id": file_id, "object": "file", "deleted": True}


async def remove(state: AppState, stored: StoredFile) -> None:
    """Delete a file: its row first (no read finds it after), then its bytes."""
    await stored_files.delete_row(state.sessions, stored.id)
    await anyio.to_thread.run_sync(state.storage.delete, stored.storage_key)


async def sweep(state: AppState) -> int:
    """Remove expired files (rows, then bytes), a batch at a time; how many."""
    removed = 0
    while True:
        expired = await stored_files.expired(state.sessions)
        for stored in expired:
            await remove(state, stored)
        removed += len(expired)
        if len(expired) < SWEEP_BATCH:
            return removed


async def sweep_expired(state: AppState) -> None:
    """Remove expired files' bytes and rows, every GPUHOST_FILE_SWEEP_SECONDS. Every gateway
    sweeps (one indexed query when nothing expired); two removing one file at once is
    harmless: the row goes once, absent bytes are fine."""
    while True:
        try:
            removed = await sweep(state)
            if removed:
                log.info("files: removed %d expired file(s)", removed)
        except Exception:
            log.exception("files: the sweep of expired files failed; it runs again later")
        await anyio.sleep(state.settings.file_sweep_seconds)
