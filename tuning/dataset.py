"""A fine-tuning dataset: a zip of images with captions, checked before anything is stored.

Captions come from a `metadata.jsonl` (lines `{"file_name": "cat.png", "text": "a cat"}`, the
Hugging Face imagefolder convention) or from a text file beside each image (`cat.png` +
`cat.txt`). Images are PNG, JPEG or WebP, each side at least `min_side`, each within the pixel
budget; the archive's uncompressed total within the tier's byte limit (zip bombs are refused
from the sizes the archive declares, and reads never go past them).
"""

import io
import json
import lzma
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

FORMATS = {"PNG", "JPEG", "WEBP"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MAX_CAPTION = 1000


class DatasetError(ValueError):
    """What is wrong with a dataset, naming the file."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class DatasetLimits:
    max_images: int
    max_bytes: int  # uncompressed, all files together
    max_pixels: int  # per image
    min_side: int = 64


@dataclass(frozen=True)
class Example:
    name: str
    caption: str


def _images(names: list[str]) -> list[str]:
    return sorted(n for n in names if PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES)


def _skipped(name: str) -> bool:
    path = PurePosixPath(name)
    return name.endswith("/") or path.parts[0] == "__MACOSX" or path.name.startswith(".")


# What reading a member of a damaged or unusual archive raises: a bad CRC (BadZipFile), an
# encrypted member (RuntimeError), an unknown compression method (NotImplementedError), a
# truncated or corrupt stream (EOFError, zlib.error, lzma.LZMAError, OSError).
UNREADABLE = (
    zipfile.BadZipFile,
    RuntimeError,
    NotImplementedError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,
)


def _read(archive: zipfile.ZipFile, name: str) -> bytes:
    if archive.getinfo(name).flag_bits & 0x1:
        raise DatasetError(f"dataset: {name} is encrypted; send it without a password")
    try:
        return archive.read(name)
    except UNREADABLE as exc:
        raise DatasetError(f"dataset: {name} cannot be read ({exc})") from None


def _captions(archive: zipfile.ZipFile, names: list[str], images: list[str]) -> dict[str, str]:
    """Each image's caption: its metadata.jsonl line, else the .txt file beside it."""
    listed: dict[str, str] = {}
    texts: dict[str, str] = {}
    for name in names:
        path = PurePosixPath(name)
        if path.name == "metadata.jsonl":
            lines = _read(archive, name).decode("utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    file_name, text = str(entry["file_name"]), str(entry["text"])
                except (ValueError, KeyError, TypeError):
                    raise DatasetError(
                        f'dataset: {name} line {number} is not {{"file_name": ..., "text": ...}}'
                    ) from None
                listed[str(path.parent / file_name)] = text
        elif path.suffix == ".txt":
            texts[str(path.with_suffix(""))] = _read(archive, name).decode("utf-8", "replace")
    return {
        image: listed.get(image, texts.get(str(PurePosixPath(image).with_suffix("")), ""))
        for image in images
    }


def _check_image(data: bytes, name: str, limits: DatasetLimits) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in FORMATS:
                    raise DatasetError(
                        f"dataset: {name} is {image.format}; PNG, JPEG or WebP are accepted"
                    )
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise DatasetError(
                        f"dataset: {name} is {width}x{height} pixels; the limit is "
                        f"{limits.max_pixels} pixels",
                        too_large=True,
                    )
                if min(width, height) < limits.min_side:
                    raise DatasetError(
                        f"dataset: {name} is {width}x{height}; each side must be at least "
                        f"{limits.min_side} pixels"
                    )
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DatasetError(f"dataset: {name} is a decompression bomb", too_large=True) from None
    except UnidentifiedImageError:
        raise DatasetError(f"dataset: {name} is not an image") from None
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"dataset: {name} is corrupt or truncated ({exc})") from None


def validate(data: bytes | BinaryIO, limits: DatasetLimits) -> list[Example]:
    """The dataset's examples, in name order; DatasetError naming the first problem found.
    `data`: the zip's bytes, or a seekable file holding it (read in place, not copied)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except zipfile.BadZipFile:
        raise DatasetError("dataset: not a zip archive") from None
    with archive:
        infos = [info for info in archive.infolist() if not _skipped(info.filename)]
        declared = sum(info.file_size for info in infos)
        if declared > limits.max_bytes:
            raise DatasetError(
                f"dataset: {declared} bytes uncompressed; the limit is {limits.max_bytes}",
                too_large=True,
            )
        names = [info.filename for info in infos]
        images = _images(names)
        for name in names:
            path = PurePosixPath(name)
            if name not in images and path.suffix != ".txt" and path.name != "metadata.jsonl":
                raise DatasetError(
                    f"dataset: unexpected file {name}; images (.png .jpg .webp) with "
                    "captions (.txt beside each, or metadata.jsonl) are accepted"
                )
        if not images:
            raise DatasetError("dataset: no images (.png, .jpg, .webp) in the archive")
        if len(images) > limits.max_images:
            raise DatasetError(
                f"dataset: {len(images)} images; the limit is {limits.max_images}",
                too_large=True,
            )
        try:
            captions = _captions(archive, names, images)
        except UnicodeDecodeError:
            raise DatasetError("dataset: metadata.jsonl is not UTF-8") from None
        examples = []
        for name in images:
            caption = (captions.get(name) or "").strip()
            if not caption:
                raise DatasetError(
                    f"dataset: {name} has no caption (add {PurePosixPath(name).stem}.txt or a "
                    "metadata.jsonl line)"
                )
            if len(caption) > MAX_CAPTION:
                raise DatasetError(
                    f"dataset: the caption of {name} is over {MAX_CAPTION} characters"
                )
            _check_image(_read(archive, name), name, limits)
            examples.append(Example(name, caption))
        return examples


def examples_of(data: bytes) -> list[Example]:
    """A dataset `validate` has accepted, listed again without decoding its images (the train
    worker's view of what the gateway checked)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [info.filename for info in archive.infolist() if not _skipped(info.filename)]
        images = _images(names)
        captions = _captions(archive, names, images)
        return [Example(name, captions[name].strip()) for name in images]


def load(data: bytes, examples: list[Example], resolution: int) -> list[tuple[Image.Image, str]]:
    """The examples' images as RGB squares of `resolution` (resized, centre-cropped)."""
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for example in examples:
            with Image.open(io.BytesIO(archive.read(example.name))) as image:
                rgb = image.convert("RGB")
            scale = resolution / min(rgb.size)
            size = (
                max(resolution, round(rgb.width * scale)),
                max(resolution, round(rgb.height * scale)),
            )
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
            left, top = (rgb.width - resolution) // 2, (rgb.height - resolution) // 2
            out.append(
                (rgb.crop((left, top, left + resolution, top + resolution)), example.caption)
            )
    return out
