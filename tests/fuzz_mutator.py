"""A seeded mutator of DICOM Part-10 files, and the seed phantom files it mutates.

Each case is a pure function of (seed file, case number): the same number always gives the same
bytes, so a failure found in CI is reproduced with one call. Mutation kinds (issue 8, point 2):
truncation at element boundaries, bit flips, length fields set huge, a wrong transfer syntax,
PixelData not matching Rows x Columns x BitsAllocated, and headers claiming 10,000 frames.
Byte-level kinds work on an element map from `walk_elements`, so they hit the structure a
parser trusts (tags, VRs, lengths) rather than only pixel bytes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom
import pydicom.pixels
from dicom_factory import SMALL_SERIES_LESIONS, chest_volume, ct_dataset
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length.
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_ITEM_TAGS = {(0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)}
_UNDEFINED = 0xFFFFFFFF

# Syntaxes a "wrong transfer syntax" case declares (plus one that is not a UID at all).
WRONG_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    "1.2.840.10008.1.2.4.999",
    "not.a.uid",
)

SEED_SERIES_UID = "1.2.826.0.1.3680043.8.498.1001"
SEED_STUDY_UID = "1.2.826.0.1.3680043.8.498.1002"
SEED_FRAME_UID = "1.2.826.0.1.3680043.8.498.1003"


@dataclass(frozen=True)
class Element:
    """Where one element (or encapsulated item) sits in the file."""

    tag: tuple[int, int]
    start: int  # first byte of the tag
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4 bytes
    value_at: int  # first byte of the value
    length: int  # as written (0xFFFFFFFF: undefined)


def walk_elements(data: bytes) -> list[Element]:
    """The top-level elements of a Part-10 file, plus encapsulated pixel items.

    Explicit VR only (the file meta is always explicit little endian; the seeds' data sets are
    explicit VR too, little or big endian). Stops quietly where the bytes stop making sense.
    """
    elements: list[Element] = []
    # Running off the end of a truncated file stops the walk: what was found so far stands.
    with contextlib.suppress(struct.error):
        _walk(data, elements)
    return elements


def _walk(data: bytes, elements: list[Element]) -> None:
    offset = 132 if data[128:132] == b"DICM" else 0
    meta_end: int | None = None
    big_endian = False
    while offset + 8 <= len(data):
        if meta_end is not None and offset >= meta_end:
            big_endian = _declared_syntax(data, elements) == ExplicitVRBigEndian
            meta_end = None
        endian = ">" if big_endian and not _in_meta(data, offset) else "<"
        group, number = struct.unpack_from(f"{endian}HH", data, offset)
        tag = (group, number)
        if tag in _ITEM_TAGS:
            (length,) = struct.unpack_from(f"{endian}I", data, offset + 4)
            elements.append(Element(tag, offset, offset + 4, 4, offset + 8, length))
            offset += 8 + (0 if tag != (0xFFFE, 0xE000) or length == _UNDEFINED else length)
            continue
        vr = data[offset + 4 : offset + 6]
        if not vr.isalpha():
            break
        if vr in _LONG_VRS:
            if offset + 12 > len(data):
                break
            (length,) = struct.unpack_from(f"{endian}I", data, offset + 8)
            element = Element(tag, offset, offset + 8, 4, offset + 12, length)
        else:
            (length,) = struct.unpack_from(f"{endian}H", data, offset + 6)
            element = Element(tag, offset, offset + 6, 2, offset + 8, length)
        elements.append(element)
        if tag == (0x0002, 0x0000):
            meta_end = element.value_at + 4 + struct.unpack_from("<I", data, element.value_at)[0]
        offset = element.value_at + (0 if length == _UNDEFINED else length)


def _in_meta(data: bytes, offset: int) -> bool:
    return offset >= 132 and struct.unpack_from("<H", data, offset)[0] == 0x0002


def _declared_syntax(data: bytes, elements: Sequence[Element]) -> str:
    for e in elements:
        if e.tag == (0x0002, 0x0010):
            return (
                data[e.value_at : e.value_at + e.length].rstrip(b"\0 ").decode("ascii", "replace")
            )
    return ""


# --- seeds -------------------------------------------------------------------------------------


def seed_series(slices: int = 3, size: int = 32) -> list[Dataset]:
    """A small valid phantom series with fixed UIDs (so mutations are reproducible)."""
    volume = chest_volume(slices, size, SMALL_SERIES_LESIONS[:1] if slices >= 5 else ())
    datasets = []
    for z in range(slices):
        ds = ct_dataset(
            volume[z],
            index=z + 1,
            position=(-11.2, -11.2, 2.5 * z),
            series_uid=SEED_SERIES_UID,
            study_uid=SEED_STUDY_UID,
            frame_uid=SEED_FRAME_UID,
        )
        uid = f"1.2.826.0.1.3680043.8.498.{2000 + z}"
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        datasets.append(ds)
    return datasets


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def seed_files(series: Sequence[Dataset]) -> dict[str, bytes]:
    """The files mutations start from: the middle slice as written, big endian, and every
    lossless compressed syntax this machine can encode (so bit flips reach the codecs)."""
    middle = series[len(series) // 2]
    seeds = {"explicit_le": to_bytes(middle)}
    big = copy.deepcopy(middle)
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    pixels = middle.pixel_array
    big.PixelData = pixels.astype(">i2").tobytes()
    buffer = io.BytesIO()
    big.save_as(buffer, enforce_file_format=True, little_endian=False, implicit_vr=False)
    seeds["explicit_be"] = buffer.getvalue()
    for name, syntax in (("rle", RLELossless), ("j2k", JPEG2000Lossless), ("jls", JPEGLSLossless)):
        if not pydicom.pixels.get_encoder(syntax).is_available:
            continue
        compressed = copy.deepcopy(middle)
        compressed.compress(syntax)
        seeds[name] = to_bytes(compressed)
    return seeds


# --- mutations ---------------------------------------------------------------------------------

Mutation = Callable[[bytes, list[Element], random.Random], bytes]


def truncate_at_boundary(data: bytes, elements: list[Element], rng: random.Random) -> bytes:
    """Cut the file at an element's first byte, inside its header, or just into its value."""
    element = rng.choice(elements)
    cut = rng.choice(
        (element.start, element.length_at, element.value_at, element.value_at + rng.randint(1, 8))
    )
    return data[: min(cut, len(data))]


def flip_bits(data: bytes, elements: list[Element], rng: random.Random) -> bytes:
    """Flip 1-16 bits, half the time inside element headers (where parsers trust the bytes)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        if rng.random() < 0.5 and elements:
            element = rng.choice(elements)
            position = rng.randrange(element.start, min(element.value_at, len(out)))
        else:
            position = rng.randrange(132, len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def huge_length(data: bytes, elements: list[Element], rng: random.Random) -> bytes:
    """Set one element's length field to a huge (or odd, or undefined) value."""
    element = rng.choice(elements)
    out = bytearray(data)
    if element.length_size == 2:
        value = rng.choice((0xFFFF, 0xFFFE, 0x8001, element.length + 1))
        struct.pack_into("<H", out, element.length_at, value)
    else:
        value = rng.choice((0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x10000000, element.length + 1))
        struct.pack_into("<I", out, element.length_at, value)
    return bytes(out)


def wrong_transfer_syntax(data: bytes, elements: list[Element], rng: random.Random) -> bytes:
    """Declare another transfer syntax than the data set is encoded in (lengths kept valid)."""
    syntax = rng.choice(WRONG_SYNTAXES).encode()
    if len(syntax) % 2:
        syntax += b"\0"
    for e in elements:
        if e.tag == (0x0002, 0x0010) and e.length_size == 2:
            delta = len(syntax) - e.length
            out = bytearray(data[: e.value_at] + syntax + data[e.value_at + e.length :])
            struct.pack_into("<H", out, e.length_at, len(syntax))
            group = next((g for g in elements if g.tag == (0x0002, 0x0000)), None)
            if group is not None:
                (meta_length,) = struct.unpack_from("<I", out, group.value_at)
                struct.pack_into("<I", out, group.value_at, meta_length + delta)
            return bytes(out)
    return data


def pixel_size_mismatch(data: bytes, elements: list[Element], rng: random.Random) -> bytes:
    """Rows, Columns or BitsAllocated not matching the PixelData that follows (or the other
    way round): the classic buffer over-read."""
    ds = pydicom.dcmread(io.BytesIO(data))
    choice = rng.randrange(6)
    if choice == 0:
        ds.Rows = rng.choice((0, 1, 2 * int(ds.Rows), 4096, 65535))
    elif choice == 1:
        ds.Columns = rng.choice((0, 1, 2 * int(ds.Columns), 4096, 65535))
    elif choice == 2:
        ds.BitsAllocated = rng.choice((1, 8, 12, 32, 64))
    elif choice == 3:
        keep = rng.choice((0, 1, len(ds.PixelData) // 2, len(ds.PixelData) - 2))
        ds.PixelData = ds.PixelData[:keep]
    elif choice == 4:
        ds.PixelData = ds.PixelData + bytes(rng.choice((2, 64, 4096)))
    else:
        ds.Rows, ds.Columns = 4096, 4096
    return _save(ds)


def ten_thousand_frames(data: bytes, elements: list[Element], rng: random.Random) -> bytes:
    """A header that claims 10,000 frames (or slices' worth of pixels) in one file."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.NumberOfFrames = rng.choice((10_000, 2**31 - 1, 0, -1))
    if rng.random() < 0.5:
        ds.Rows, ds.Columns = 4096, 4096
    return _save(ds)


def _save(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    ds.save_as(
        buffer,
        enforce_file_format=True,
        little_endian=syntax != ExplicitVRBigEndian,
        implicit_vr=False,
    )
    return buffer.getvalue()


MUTATIONS: dict[str, Mutation] = {
    "truncate": truncate_at_boundary,
    "bit_flip": flip_bits,
    "huge_length": huge_length,
    "wrong_syntax": wrong_transfer_syntax,
    "pixel_size": pixel_size_mismatch,
    "frames_10000": ten_thousand_frames,
}


@dataclass(frozen=True)
class Case:
    """One fuzz case: which seed, which kind(s), and the mutated bytes."""

    number: int
    seed: str
    kinds: tuple[str, ...]
    data: bytes


class Mutator:
    """Case `n` of a run seeded with `seed`: one or two mutations of one seed file."""

    def __init__(self, seeds: dict[str, bytes], seed: int = 0) -> None:
        self.seeds = dict(seeds)
        self.seed = seed
        self._names = sorted(self.seeds)
        self._elements = {name: walk_elements(data) for name, data in self.seeds.items()}
        self._kinds = sorted(MUTATIONS)

    def case(self, number: int) -> Case:
        rng = random.Random(self.seed * 1_000_003 + number)
        name = self._names[number % len(self._names)]
        data = self.seeds[name]
        kinds = [self._kinds[(number // len(self._names)) % len(self._kinds)]]
        if rng.random() < 0.2:
            kinds.append(rng.choice(self._kinds))
        for kind in kinds:
            elements = walk_elements(data) if data is not self.seeds[name] else self._elements[name]
            if not elements:
                break
            try:
                data = MUTATIONS[kind](data, elements, rng)
            except Exception:
                # A previous mutation can leave bytes the pydicom-level kinds cannot re-read;
                # the case then carries the earlier mutation only.
                continue
        return Case(number, name, tuple(kinds), data)
