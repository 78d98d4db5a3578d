"""The stack's settings, shared by every process role (gateway, workers, relay, command line):
where the shared services are, which models are served, the plans by tier, and how a setting
is read (`Listed`, `Mapped`) and how a bad one is said (`settings_problem`).

Each role's settings class derives from `StackSettings` or `ModelSettings`; all read
`GPUHOST_*` environment variables (and a `.env` file when present). This package is the
bottom floor: it imports nothing of the project, and every package may import it.
"""

import json
import re
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from config.plans import DEFAULT_PLANS, Plan


def _listed(value: object) -> object:
    """A list setting's text: a JSON array, or values separated by commas (`a,b`)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


def _mapped(value: object) -> object:
    """A mapping setting's text: a JSON object, or `name=value` pairs separated by commas."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, equals, given = part.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"expected name=value pairs or a JSON object, not {part!r}")
        pairs[name.strip()] = given.strip()
    return pairs


# A list or mapping read from the environment as JSON or in the short form (`a,b`, `a=1,b=2`)
Listed = Annotated[list[str], NoDecode, BeforeValidator(_listed)]
V = TypeVar("V")
Mapped = Annotated[dict[str, V], NoDecode, BeforeValidator(_mapped)]  # Mapped[int]


PREFIX = "GPUHOST_"


def settings_problem(exc: Exception) -> str | None:
    """What is wrong with the settings, one line per setting at fault, naming it (for a
    process that cannot start with them); None if `exc` is not about settings."""
    if isinstance(exc, SourceError):  # a value its source could not parse (bad JSON)
        named = re.search(r'field "(\w+)"', str(exc))
        name = f"{PREFIX}{named.group(1).upper()}" if named else "a setting"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        return f"{name}: not valid JSON{cause}"
    if not (isinstance(exc, ValidationError) and exc.title.endswith("Settings")):
        return None
    lines = []
    for error in exc.errors():
        field, *inside = [str(part) for part in error["loc"]] or ["?"]
        where = "".join(f"[{part!r}]" for part in inside)
        given = error.get("input")
        shown = f" (given: {given!r})" if isinstance(given, str | int | float) else ""
        lines.append(f"{PREFIX}{field.upper()}{where}: {error['msg']}{shown}")
    return "\n".join(lines)


DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/gpuhost"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class StackSettings(BaseSettings):
    """Where the shared services are."""

    model_config = SettingsConfigDict(env_prefix="GPUHOST_", env_file=".env", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    # Celery broker. Empty means: the Redis above.
    broker_url: str = ""
    # Plans by tier (concurrency, allowance, prices); GPUHOST_PLANS as JSON replaces them.
    plans: dict[str, Plan] = Field(default_factory=lambda: dict(DEFAULT_PLANS))
    # A slot is a lease, renewed by the gateway and the worker of its request: one whose
    # holders both died comes back within this time.
    lease_ttl_seconds: float = 30.0
    # How long a job's chunks stay readable in Redis after it ends (resumable streams).
    stream_retention_seconds: int = 600
    # A job whose worker died is delivered again after this long (Redis broker).
    visibility_timeout_seconds: float = 120.0
    restore_interval_seconds: float = 10.0

    @property
    def tier_limits(self) -> dict[str, int]:
        """Requests in flight allowed per tier."""
        return {tier: plan.concurrency for tier, plan in self.plans.items()}

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    def celery(self) -> dict:
        """Keyword arguments for `workers.contract.celery_config`."""
        return {
            "broker_url": self.celery_broker_url,
            "visibility_timeout": self.visibility_timeout_seconds,
            "restore_interval": self.restore_interval_seconds,
        }


class ModelSettings(StackSettings):
    """Which models are served, by name, and where their weights are."""

    models_dir: Path = Path(".gpuhost/models")
    llava_model: str = "llava-llama3"
    llava_path: Path | None = None
    sd_model: str = "stable-diffusion"
    sd_path: Path | None = None
    # Uploads, results and adapters: a directory, or an fsspec URL (s3://bucket/prefix).
    storage_url: str = ".gpuhost/storage"

    def llava_weights(self) -> Path:
        return self.llava_path or self.models_dir / self.llava_model

    def sd_weights(self) -> Path:
        return self.sd_path or self.models_dir / self.sd_model
