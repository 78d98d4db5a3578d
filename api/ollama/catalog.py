"""The models this service offers (/api/tags, /api/show) and what the workers have loaded
(/api/ps), from settings and the statuses workers publish to Redis."""

from datetime import UTC, datetime

from api.pipeline import fleet
from api.state import AppState
from workers.contract import WorkerStatus

FAMILY = {"format": "safetensors", "family": "llava", "families": ["llama", "clip"]}
SD = {"format": "diffusers", "family": "stable-diffusion", "families": ["unet", "vae", "clip"]}
QUANTIZATION = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


def _modified(statuses: list[WorkerStatus]) -> str:
    """When the model's weights last changed, as its workers say (Ollama's modified_at)."""
    return _iso(max((s.weights_modified_at for s in statuses), default=0.0))


def _parameter_size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


async def worker_statuses(state: AppState) -> list[WorkerStatus]:
    return await fleet.worker_statuses(state.redis)


def _details(statuses: list[WorkerStatus]) -> dict:
    loaded = [s for s in statuses if s.loaded]
    parameters = max((s.parameters for s in loaded), default=0)
    dtype = loaded[0].dtype if loaded else ""
    return FAMILY | {
        "parameter_size": _parameter_size(parameters) if parameters else "",
        "quantization_level": QUANTIZATION.get(dtype, dtype.upper()),
    }


async def tags(state: AppState) -> dict:
    """Every configured model: LLaVA (chat) and Stable Diffusion (images)."""
    everything = await worker_statuses(state)
    models = []
    for model, family in ((state.settings.llava_model, FAMILY), (state.settings.sd_model, SD)):
        statuses = [s for s in everything if s.model == model]
        loaded = [s for s in statuses if s.loaded]
        models.append(
            {
                "name": f"{model}:latest",
                "model": f"{model}:latest",
                "modified_at": _modified(statuses),
                "size": max((s.size_bytes for s in loaded), default=0),
                "digest": "",
                "details": _details(statuses) | family,
            }
        )
    return {"models": models}


async def running(state: AppState) -> dict:
    """Loaded models, one entry per model, with how many workers hold it."""
    statuses = [s for s in await worker_statuses(state) if s.loaded]
    by_model: dict[str, list[WorkerStatus]] = {}
    for status in statuses:
        by_model.setdefault(status.model, []).append(status)
    models = []
    for model, held in sorted(by_model.items()):
        expiries = [s.expires_at for s in held]
        models.append(
            {
                "name": f"{model}:latest",
                "model": f"{model}:latest",
                "size": held[0].size_bytes,
                "digest": "",
                "details": _details(held) | (SD if held[0].queue == "sd" else FAMILY),
                # None: stays loaded for as long as its workers run.
                "expires_at": None if None in expiries else _iso(max(expiries)),
                "size_vram": held[0].size_bytes if held[0].device.startswith("cuda") else 0,
                "context_length": held[0].context_length,
                "workers": len(held),
                "active": sum(s.active for s in held),
            }
        )
    return {"models": models}


async def show(state: AppState, model: str) -> dict:
    statuses = [s for s in await worker_statuses(state) if s.model == state.settings.llava_model]
    context = max((s.context_length for s in statuses), default=None)
    info = {"general.architecture": "llava", "general.basename": state.settings.llava_model}
    if context:
        info["llama.context_length"] = context
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(statuses),
        "model_info": info,
        "capabilities": ["completion", "vision"],
        "modified_at": _modified(statuses),
    }
