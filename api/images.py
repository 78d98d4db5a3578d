"""Checking images a client sent, before anything is queued or held."""

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from api.errors import BadRequest, PayloadTooLarge

DATA_URL_MARK = ";base64,"


def check_image(data: str, field: str, max_pixels: int) -> str:
    """Validate one base64 image; return its base64 (a data: URL prefix is removed)."""
    return check_image_sized(data, field, max_pixels)[0]


def check_image_sized(data: str, field: str, max_pixels: int) -> tuple[str, tuple[int, int]]:
    """Validate one base64 image; return its base64 and its (width, height).

    Rejects malformed base64, data that is not an image, truncated images, and images over
    `max_pixels` (decompression bombs included), each with a message naming `field`.
    """
    if data.startswith("data:"):
        head, sep, rest = data.partition(DATA_URL_MARK)
        if not sep or not head[5:].startswith("image/"):
            raise BadRequest(f"{field}: a data URL must be data:image/...;base64,...")
        data = rest
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: not valid base64") from None
    if not raw:
        raise BadRequest(f"{field}: empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise PayloadTooLarge(
                        f"{field}: image is {width}x{height} pixels; "
                        f"the limit is {max_pixels} pixels"
                    )
                image.load()  # decodes fully: truncated data fails here
                size = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(
            f"{field}: image is too large to decode (decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise BadRequest(
            f"{field}: not an image (PNG, JPEG, GIF, WebP, BMP are accepted)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadRequest(f"{field}: corrupt or truncated image ({exc})") from None
    return data, size
