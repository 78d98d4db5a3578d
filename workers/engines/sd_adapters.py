"""LoRA adapters (from fine-tuning) on the UNet that the Stable Diffusion pipelines share.

An adapter is read from storage on first use and kept loaded, the least recently used one
unloaded beyond a limit; a batch without one runs with the adapters switched off. A compiled
UNet's graph is the UNet without adapter layers, so there a batch without an adapter unloads
them all instead (each is read again when next asked for), and runs compiled.
"""

from collections import OrderedDict

from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from storage import Storage
from workers.contract import ImageJob
from workers.engines.base import InvalidRequest


class Adapters:
    def __init__(
        self, pipe: StableDiffusionPipeline, storage: Storage | None, limit: int, compiled: bool
    ):
        self.pipe = pipe
        self.storage = storage
        self.limit = limit
        self.compiled = compiled
        self._loaded: OrderedDict[str, None] = OrderedDict()

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def use(self, job: ImageJob) -> None:
        """Put the job's adapter (or none) on the UNet (the engine has checked that a job
        naming one has its storage key)."""
        if job.lora is None:
            if self._loaded and self.compiled:
                self.pipe.unload_lora_weights()
                self._loaded.clear()
            elif self._loaded:
                self.pipe.disable_lora()
            return
        if job.lora not in self._loaded:
            try:
                state = load_safetensors(self.storage.get(job.lora_key))
            except (FileNotFoundError, SafetensorError) as exc:
                raise InvalidRequest(f"LoRA adapter '{job.lora}' not found") from exc
            self.pipe.load_lora_weights(state, adapter_name=job.lora)
            self._loaded[job.lora] = None
            while len(self._loaded) > self.limit:
                old, _ = self._loaded.popitem(last=False)
                self.pipe.delete_adapters(old)
        self._loaded.move_to_end(job.lora)
        self.pipe.enable_lora()
        self.pipe.set_adapters([job.lora], adapter_weights=[job.lora_weight])
