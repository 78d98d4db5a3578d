"""Where uploads, results and adapters live: one root URL, any filesystem fsspec speaks.

The default is a local directory (`.gpuhost/storage`); deployments point GPUHOST_STORAGE_URL at
object storage (`s3://bucket/prefix`, with the `s3fs` package and its usual credentials), so
that every gateway and worker sees the same objects. Every object belongs to a tenant: keys
are `tenants/<tenant id>/<kind>/<name...>`, made only by `tenant_key`, whose parts cannot
climb out of their prefix. Writes are bounded: over `max_bytes` the object is not kept.
"""

import re
import uuid
from collections.abc import Iterable
from typing import BinaryIO

import fsspec

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TooLarge(Exception):
    """An object over its size limit (nothing was kept)."""


def tenant_key(tenant_id: uuid.UUID | str, kind: str, *names: str) -> str:
    """The key of a tenant's object: each part a plain name (no separators, no `..`)."""
    parts = [str(uuid.UUID(str(tenant_id))), kind, *names]
    for part in parts:
        if not _PART.match(part) or ".." in part:
            raise ValueError(f"not a storage name: {part!r}")
    return "tenants/" + "/".join(parts)


def file_key(tenant_id: uuid.UUID | str, file_id: str) -> str:
    """Where a tenant's file (`/v1/files`) keeps its bytes."""
    return tenant_key(tenant_id, "files", file_id)


class Storage:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def put(self, key: str, data: bytes) -> int:
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)
        return len(data)

    def put_stream(self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> int:
        """Write chunks as they come; over `max_bytes` (if given), remove what was written and
        raise."""
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        size = 0
        try:
            with self.fs.open(path, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(f"over the limit of {max_bytes} bytes")
                    out.write(chunk)
        except BaseException:
            self.delete(key)
            raise
        return size

    def put_file(self, key: str, source: BinaryIO, max_bytes: int | None = None) -> int:
        """An open file's whole content (read from its start, a MiB at a time), as
        `put_stream` writes it."""
        source.seek(0)
        return self.put_stream(key, iter(lambda: source.read(1024 * 1024), b""), max_bytes)

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def open(self, key: str, mode: str = "rb"):
        return self.fs.open(self._path(key), mode)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def size(self, key: str) -> int:
        return self.fs.size(self._path(key))

    def delete(self, key: str) -> None:
        """Remove an object, or everything under a prefix; absent is fine."""
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        if not self.fs.exists(path):
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(p.removeprefix(root) for p in self.fs.find(path))
