"""Datasets are checked before anything is stored: each problem named, with its file."""

import io
import re
import struct
import zipfile

import pytest

from tests.tuning.datasets import picture, striped, zipped
from tuning.dataset import DatasetError, DatasetLimits, examples_of, load, validate

LIMITS = DatasetLimits(max_images=10, max_bytes=1_000_000, max_pixels=512 * 512)


def damaged(how: str) -> bytes:
    """A dataset whose caption a.txt has a bad CRC, is marked encrypted, or claims an unknown
    compression method (its central directory entry edited after the fact)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.png", picture(0))
        archive.writestr("a.txt", "a striped picture")
    data = bytearray(buffer.getvalue())
    if how == "bad crc":
        at = data.index(b"a striped picture")
        data[at] = ord("b")
        return bytes(data)
    entry = data.index(b"PK\x01\x02")
    while data[entry + 46 : entry + 51] != b"a.txt":
        entry = data.index(b"PK\x01\x02", entry + 1)
    if how == "encrypted":
        flags = struct.unpack_from("<H", data, entry + 8)[0]
        struct.pack_into("<H", data, entry + 8, flags | 0x1)
    else:
        struct.pack_into("<H", data, entry + 10, 1)  # "shrunk": nothing reads it any more
    return bytes(data)


class TestAccepted:
    @pytest.mark.parametrize("captions", ["txt", "metadata"])
    def test_captions_beside_each_image_or_in_metadata(self, captions):
        examples = validate(striped(3, captions=captions), LIMITS)
        assert [(e.name, e.caption) for e in examples] == [
            (f"img{i}.png", f"a striped picture number {i}") for i in range(3)
        ]

    @pytest.mark.parametrize("captions", ["txt", "metadata"])
    def test_the_train_worker_lists_what_was_accepted(self, captions):
        data = striped(3, captions=captions)
        assert examples_of(data) == validate(data, LIMITS)

    def test_loaded_as_squares_of_the_resolution(self):
        data = zipped({"wide.jpg": picture(0, 96, "JPEG"), "wide.txt": "a wide picture"})
        [(image, caption)] = load(data, validate(data, LIMITS), 64)
        assert image.size == (64, 64) and image.mode == "RGB" and caption == "a wide picture"


class TestRefused:
    @pytest.mark.parametrize(
        ("files", "named"),
        [
            ({"a.png": picture(0), "b.png": picture(1), "a.txt": "x"}, "b.png has no caption"),
            ({"a.gif": picture(0, fmt="GIF"), "a.txt": "x"}, "unexpected file a.gif"),
            ({"a.png": picture(0, fmt="GIF"), "a.txt": "x"}, "a.png is GIF"),
            ({"a.png": b"not an image at all", "a.txt": "x"}, "a.png is not an image"),
            ({"a.png": picture(0)[: len(picture(0)) // 2], "a.txt": "x"}, "a.png is corrupt"),
            ({"a.png": picture(0, 32), "a.txt": "x"}, "a.png is 32x32"),
            ({"notes.md": "hello"}, "unexpected file notes.md"),
            ({"a.png": picture(0), "metadata.jsonl": "{oops"}, "metadata.jsonl line 1"),
            ({"readme.txt": "only text"}, "no images"),
        ],
    )
    def test_a_bad_file_is_named(self, files, named):
        with pytest.raises(DatasetError, match=named) as caught:
            validate(zipped(files), LIMITS)
        assert not caught.value.too_large

    @pytest.mark.parametrize(
        ("damage", "named"),
        [
            ("bad crc", "a.txt cannot be read (Bad CRC-32"),
            ("encrypted", "a.txt is encrypted"),
            ("unknown compression", "a.txt cannot be read (That compression method"),
        ],
    )
    def test_a_damaged_member_is_named(self, damage, named):
        with pytest.raises(DatasetError, match=re.escape(named)):
            validate(damaged(damage), LIMITS)

    def test_not_a_zip(self):
        with pytest.raises(DatasetError, match="not a zip archive"):
            validate(b"PK but not really", LIMITS)

    def test_too_many_images(self):
        with pytest.raises(DatasetError, match="11 images; the limit is 10") as caught:
            validate(striped(11), LIMITS)
        assert caught.value.too_large

    def test_a_zip_bomb_is_refused_from_its_declared_sizes(self):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("a.png", picture(0))
            archive.writestr("a.txt", b"x" * 2_000_000)  # compresses to almost nothing
        assert len(buffer.getvalue()) < 20_000
        with pytest.raises(DatasetError, match="bytes uncompressed; the limit is") as caught:
            validate(buffer.getvalue(), LIMITS)
        assert caught.value.too_large

    def test_an_image_over_the_pixel_budget(self):
        data = zipped({"big.png": picture(0, 600), "big.txt": "big"})
        with pytest.raises(DatasetError, match="big.png is 600x600 pixels") as caught:
            validate(data, LIMITS)
        assert caught.value.too_large
