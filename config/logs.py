"""How every process logs (gateway, workers, relay, beat, `gpuhost dev`): one handler on the
root logger, through which uvicorn's and Celery's own loggers go too, in the format
GPUHOST_LOG_FORMAT names: `text` (the default) or `json`, one object per line with `time`,
`level`, `logger`, `message` and, where known, the `request_id`, `tenant_id` and `model` of
the request a line is about (`bind` says them for the work under way: the gateway for a
request, a worker for a job), and its `trace_id` when it is traced (config/traces.py).

No secret reaches a line: API keys (`gph_...`), bearer tokens, and the operator's secrets set
in the environment (admin token, Stripe keys, signing secrets) are masked in every line,
whatever logged them.
"""

import contextvars
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict
from pythonjsonlogger.json import JsonFormatter

from config import traces

FIELDS = ("request_id", "tenant_id", "model")
_CONTEXT = {name: contextvars.ContextVar(name, default=None) for name in FIELDS}
# Settings whose values are secrets: masked wherever they would appear.
SECRET_SETTINGS = (
    "GPUHOST_ADMIN_TOKEN",
    "GPUHOST_STRIPE_API_KEY",
    "GPUHOST_STRIPE_WEBHOOK_SECRET",
    "GPUHOST_STRIPE_EVENTS_SECRET",
)
# API keys, webhook signing secrets, Stripe's keys and secrets, bearer credentials
SECRETS = re.compile(
    r"gph_[A-Za-z0-9_-]{6,}|whsec_[A-Za-z0-9+/=_%-]{8,}|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{8,}"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
)
MASK = "[redacted]"
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUHOST_", env_file=".env", extra="ignore")

    log_format: Literal["text", "json"] = "text"


def bind(**values: str | None) -> None:
    """Say what the work under way is about (`request_id`, `tenant_id`, `model`): every line
    logged in this context from now on carries it."""
    for name, value in values.items():
        _CONTEXT[name].set(str(value) if value is not None else None)


def bound(name: str) -> str | None:
    return _CONTEXT[name].get()


class _Context(logging.Filter):
    """Puts the bound fields on each record (a field the call gave in `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)  # uvicorn's, with terminal colours
        for name, var in _CONTEXT.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        if getattr(record, "trace_id", None) is None:
            record.trace_id = traces.trace_id()
        return True


class _Masking:
    """Masks secrets in a formatted line."""

    def __init__(self) -> None:
        values = (os.environ.get(name, "") for name in SECRET_SETTINGS)
        self.known = [value for value in values if len(value) >= 8]

    def mask(self, line: str) -> str:
        line = SECRETS.sub(MASK, line)
        for secret in self.known:
            line = line.replace(secret, MASK)
        return line


class _Json(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "message", *FIELDS, "trace_id"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
        self._masking = _Masking()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        """ISO 8601, UTC, to the millisecond."""
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        return self._masking.mask(super().format(record))


class _Text(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT)
        self._masking = _Masking()

    def format(self, record: logging.LogRecord) -> str:
        return self._masking.mask(super().format(record))


def configure(log_format: str | None = None) -> None:
    """Log through one handler on stderr in `log_format` (else GPUHOST_LOG_FORMAT's)."""
    chosen = log_format or LogSettings().log_format
    if chosen == "json":  # progress bars are not lines: none (tqdm's, Hugging Face's)
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(_Json() if chosen == "json" else _Text())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python's warnings are lines of the same kind
