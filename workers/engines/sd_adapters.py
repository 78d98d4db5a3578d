"""LoRA adapters (from fine-tuning) on the UNet that the Stable Diffusion pipelines share.

Uncompiled, an adapter is read from storage on first use and kept loaded as layers beside the
weights it adapts, the least recently used one unloaded beyond a limit; a batch without one
runs with the adapters switched off.

Compiled, the graph is the UNet's without adapter layers, so an adapter is fused instead: its
product is added into the weights it adapts (at the batch's adapter weight), the layers are
taken off again, and the compiled graph runs on the changed weights. Those weights are kept as
they were beforehand and copied back, exactly, for the next batch with another adapter or none.
"""

from collections import OrderedDict

import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
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
        self._files: OrderedDict[str, bytes] = OrderedDict()  # read from storage
        self._loaded: OrderedDict[str, None] = OrderedDict()  # as layers (uncompiled)
        self.fused: tuple[str, float] | None = None  # the adapter and weight in the UNet's weights
        self._originals: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []

    def use(self, job: ImageJob) -> None:
        """Put the job's adapter (or none) on the UNet (the engine has checked that a job
        naming one has its storage key)."""
        if self.compiled:
            self._fuse(job)
        else:
            self._layer(job)

    def _read(self, job: ImageJob) -> dict[str, torch.Tensor]:
        """The adapter's tensors, its file kept in memory (the last `limit` read)."""
        if job.lora not in self._files:
            try:
                self._files[job.lora] = self.storage.get(job.lora_key)
            except FileNotFoundError as exc:
                raise InvalidRequest(f"LoRA adapter '{job.lora}' not found") from exc
            while len(self._files) > self.limit:
                self._files.popitem(last=False)
        self._files.move_to_end(job.lora)
        try:
            return load_safetensors(self._files[job.lora])
        except SafetensorError as exc:
            del self._files[job.lora]
            raise InvalidRequest(f"LoRA adapter '{job.lora}' not found") from exc

    def _layer(self, job: ImageJob) -> None:
        if job.lora is None:
            if self._loaded:
                self.pipe.disable_lora()
            return
        if job.lora not in self._loaded:
            self.pipe.load_lora_weights(self._read(job), adapter_name=job.lora)
            self._loaded[job.lora] = None
            while len(self._loaded) > self.limit:
                old, _ = self._loaded.popitem(last=False)
                self.pipe.delete_adapters(old)
        self._loaded.move_to_end(job.lora)
        self.pipe.enable_lora()
        self.pipe.set_adapters([job.lora], adapter_weights=[job.lora_weight])

    def _fuse(self, job: ImageJob) -> None:
        wanted = (job.lora, job.lora_weight) if job.lora is not None else None
        if wanted == self.fused:
            return
        self._restore()
        if wanted is None:
            return
        self.pipe.load_lora_weights(self._read(job), adapter_name=job.lora)
        try:
            adapted = [m.base_layer for m in self.pipe.unet.modules() if isinstance(m, LoraLayer)]
            self._originals = [
                (layer, {name: t.clone() for name, t in layer.state_dict().items()})
                for layer in adapted
            ]
            self.pipe.set_adapters([job.lora], adapter_weights=[job.lora_weight])
            self.pipe.fuse_lora(components=["unet"], adapter_names=[job.lora])
            self.fused = wanted
        finally:
            self.pipe.unload_lora_weights()  # the layers off, the fused weights stay
            if self.fused != wanted:  # fusing failed part way
                self._restore()

    @torch.no_grad()
    def _restore(self) -> None:
        """The adapted weights back as they were before the adapter was fused."""
        for layer, tensors in self._originals:
            layer.load_state_dict(tensors)
        self._originals = []
        self.fused = None
