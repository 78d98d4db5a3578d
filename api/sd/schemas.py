"""Image request wire formats; requests translate themselves into `ImageJob`s."""

import random
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.errors import BadRequest
from api.inputs.image_checks import check_image_sized
from workers.contract import ImageJob


class ImageLimits(BaseModel):
    max_side: int  # pixels, each of width and height
    max_input_pixels: int  # for uploaded images and masks
    max_n: int  # images per request, by tier
    default_side: int = 512  # width and height when neither the request nor its image says


MIN_SIDE = 64  # pixels: the smallest width or height an image may have


def _multiple_of_8(value: int | None) -> int | None:
    if value is not None and value % 8:
        raise ValueError(f"{value} is not a multiple of 8")
    return value


class ImagesRequest(BaseModel):
    """POST /api/images: text-to-image; image-to-image with `image`; inpainting with `image`
    and `mask` (white = repaint); any of them in the style of `style_image`."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    width: int | None = Field(None, ge=MIN_SIDE)
    height: int | None = Field(None, ge=MIN_SIDE)
    num_inference_steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0, le=30)
    scheduler: Literal["euler", "euler_a", "dpmpp_2m", "ddim"] = "euler"
    seed: int | None = Field(None, ge=0, lt=2**63 - 1024)
    n: int = Field(1, ge=1)
    image: str | None = None
    mask: str | None = None
    strength: float = Field(0.8, gt=0, le=1)
    lora: str | None = Field(None, min_length=1, max_length=64, description="an adapter id")
    lora_weight: float = Field(1.0, ge=-4, le=4, description="how strongly the adapter applies")
    style_image: str | None = Field(None, description="a reference image whose style applies")
    style_strength: float = Field(0.6, ge=0, le=1, description="how strongly the style applies")
    stream: bool = False

    _check_width = field_validator("width")(lambda cls, v: _multiple_of_8(v))
    _check_height = field_validator("height")(lambda cls, v: _multiple_of_8(v))

    @field_validator("lora")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and not all("!" <= c <= "~" for c in value):
            raise ValueError("an adapter id is printable ASCII, without spaces")
        return value

    def to_job(
        self,
        owner,
        request_id: str,
        model: str,
        limits: ImageLimits,
        lora_key: str | None = None,
    ) -> ImageJob:
        """The worker's job; `lora_key`: where the (already checked) adapter's file is."""
        if self.n > limits.max_n:
            raise BadRequest(
                f"field 'n': {self.n} images; the {owner.tier} tier allows at most "
                f"{limits.max_n} per request",
                param="n",
            )
        if self.mask is not None and self.image is None:
            raise BadRequest("field 'mask': inpainting needs an 'image' too", param="mask")
        image = mask = None
        width, height = self.width, self.height
        if self.image is not None:
            image, (w, h) = check_image_sized(self.image, "image", limits.max_input_pixels)
            width = width or max(64, w // 8 * 8)
            height = height or max(64, h // 8 * 8)
            if self.mask is not None:
                mask, mask_size = check_image_sized(self.mask, "mask", limits.max_input_pixels)
                if mask_size != (w, h):
                    raise BadRequest(
                        f"field 'mask': mask is {mask_size[0]}x{mask_size[1]} but the image is "
                        f"{w}x{h}; they must be the same size",
                        param="mask",
                    )
        style = None
        if self.style_image is not None:
            style, _ = check_image_sized(self.style_image, "style_image", limits.max_input_pixels)
        width, height = width or limits.default_side, height or limits.default_side
        for name, value in (("width", width), ("height", height)):
            if value > limits.max_side:
                raise BadRequest(
                    f"field '{name}': {value} is over the limit of {limits.max_side} pixels",
                    param=name,
                )
        kind = "inpaint" if mask else "img2img" if image else "txt2img"
        return ImageJob(
            request_id=request_id,
            tenant_id=owner.tenant_id,
            api_key_id=owner.key_id,
            model=model,
            kind=kind,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            seed=self.seed if self.seed is not None else random.randrange(2**31),
            n=self.n,
            image=image,
            mask=mask,
            strength=self.strength,
            lora=self.lora,
            lora_key=lora_key,
            lora_weight=self.lora_weight,
            style_image=style,
            style_strength=self.style_strength,
            enqueued_at=time.time(),
        )
