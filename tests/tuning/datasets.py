"""Fine-tuning datasets for the tests: zips of small generated images with captions."""

import io
import json
import zipfile

import numpy as np
from PIL import Image


def picture(index: int, size: int = 64, fmt: str = "PNG") -> bytes:
    """A striped image, its colour by index."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, :, index % 3] = 200
    pixels[:: max(2, size // 8)] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def zipped(files: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def striped(count: int = 4, size: int = 64, captions: str = "txt") -> bytes:
    """`count` images with captions in .txt files beside them, or in a metadata.jsonl."""
    files: dict[str, bytes | str] = {}
    lines = []
    for i in range(count):
        files[f"img{i}.png"] = picture(i, size)
        caption = f"a striped picture number {i}"
        if captions == "txt":
            files[f"img{i}.txt"] = caption
        else:
            lines.append(json.dumps({"file_name": f"img{i}.png", "text": caption}))
    if lines:
        files["metadata.jsonl"] = "\n".join(lines)
    return zipped(files)
