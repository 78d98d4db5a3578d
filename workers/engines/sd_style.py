"""Style from a reference image: an IP-Adapter on the UNet the Stable Diffusion pipelines share.

A model has one when its folder holds `ip_adapter/ip-adapter.safetensors` (the adapter, as
IP-Adapter's own files are laid out: `image_proj.*` and `ip_adapter.*` tensors) and
`ip_adapter/image_encoder/` (its CLIP vision encoder with projection). Both are read once, at
load. The adapter goes onto the UNet for each batch that asks for a style, at the batch's
scale, and comes off afterwards, the UNet's attention processors put back as they were (the
same objects, so that a compiled UNet's guards still hold for the batches without a style).

Each request's reference image is encoded on its own (one image per encoder pass), so that a
request's embedding, and with its seed its image, is the same alone or in a batch. A batch's
rows may have different references: the pipelines take the embeddings row by row (`RowStyles`).
"""

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection

FOLDER = "ip_adapter"
WEIGHTS = "ip-adapter.safetensors"
ENCODER = "image_encoder"


class _CastWithNothingToKeep(logging.Filter):
    """diffusers warns at every cast of a UNet that some of its modules should be kept in
    float32, naming them; loading the adapter casts it, and this UNet has none ("[]")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_CastWithNothingToKeep())


class RowStyles:
    """Mixed into the engine's pipelines: `ip_adapter_image_embeds` given for every row of the
    batch are used as they are. diffusers' own method takes one reference for the whole batch
    and repeats it for every prompt, which would mix rows that bring references of their own."""

    def prepare_ip_adapter_image_embeds(
        self, image, image_embeds, device, num_images_per_prompt, do_classifier_free_guidance
    ):
        if image_embeds is None:
            return super().prepare_ip_adapter_image_embeds(
                image, image_embeds, device, num_images_per_prompt, do_classifier_free_guidance
            )
        return [embeds.to(device) for embeds in image_embeds]


class Style:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(folder / ENCODER, dtype=dtype)
        self.encoder.to(device).eval()
        self.weights: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, tensor in load_file(folder / WEIGHTS, device=str(device)).items():
            part, _, name = key.partition(".")
            if part in self.weights:
                self.weights[part][name] = tensor.to(dtype)
        missing = [part for part, tensors in self.weights.items() if not tensors]
        if missing:
            raise ValueError(f"{folder / WEIGHTS} has no {' or '.join(missing)} tensors")

    @classmethod
    def of_model(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "Style | None":
        """The model's IP-Adapter, or None if its folder has none."""
        folder = path / FOLDER
        if not (folder / WEIGHTS).is_file():
            return None
        return cls(folder, device, dtype)

    @contextlib.contextmanager
    def applied(self, pipe: StableDiffusionPipeline, strength: float) -> Iterator[None]:
        """The adapter on `pipe`'s UNet at `strength` while the batch runs."""
        processors = pipe.unet.attn_processors
        pipe.image_encoder = self.encoder  # so that diffusers loads no encoder of its own
        try:
            pipe.load_ip_adapter(self.weights, subfolder=None, weight_name=None)
            pipe.set_ip_adapter_scale(strength)
            yield
        finally:
            if pipe.unet.encoder_hid_proj is not None:
                pipe.unload_ip_adapter()
            pipe.image_encoder = None
            pipe.unet.set_attn_processor(processors)

    @torch.inference_mode()
    def embeds(
        self, pipe: StableDiffusionPipeline, rows: list[Image.Image], guidance: bool
    ) -> torch.Tensor:
        """What the pipeline takes as `ip_adapter_image_embeds` (for its one adapter): each
        row's reference image encoded, [rows, 1, dim], after as many zero rows (the
        unconditional half) when the batch runs with classifier-free guidance."""
        encoded: dict[int, torch.Tensor] = {}
        for image in rows:
            if id(image) not in encoded:
                embeds, _ = pipe.encode_image(image, self.encoder.device, 1)
                encoded[id(image)] = embeds
        positive = torch.cat([encoded[id(image)] for image in rows])[:, None, :]
        if not guidance:
            return positive
        return torch.cat([torch.zeros_like(positive), positive])
