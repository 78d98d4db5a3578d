"""A Stable Diffusion request inside the engine: its job, where its progress goes, its
decoded images, and what it gets back."""

import base64
import io
import threading
from dataclasses import dataclass, field

from PIL import Image

from workers.contract import ImageJob


class ProgressSink:
    """Where the engine reports a request's progress; also says when its client has gone."""

    def progress(self, step: int, steps: int) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass(frozen=True)
class Rendering:
    images: list[str]  # base64 PNGs
    gpu_seconds: float
    run_seconds: float
    batch_images: int
    cancelled: bool


@dataclass(eq=False)
class ImageRequest:
    job: ImageJob
    sink: ProgressSink
    image: Image.Image | None
    mask: Image.Image | None
    style: Image.Image | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Rendering | None = None
    error: BaseException | None = None

    def shape(self) -> tuple:
        j = self.job
        return (
            j.kind,
            j.width,
            j.height,
            j.steps,
            j.scheduler,
            j.guidance_scale,
            j.strength,
            j.lora,
            j.lora_weight,
            # a batch runs with the IP-Adapter on or off, at one scale
            j.style_strength if j.style_image is not None else None,
        )


def decode_image(data: str, mode: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert(mode)


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()
