"""Read one DICOM Part-10 file into a validated CT slice in Hounsfield units.

Every check fails fast with one error that names the file and the attribute at fault (never a
patient identifier). Used file by file: by `load_series_dir` on a folder, and by the gateway on
each file of a stream as it arrives.

Decisions (documented here because the gateway and the export side rely on them):
- Accepted: CT Image Storage only, one frame per file, Modality CT. Enhanced / Legacy Converted
  Enhanced CT (multi-frame, geometry in functional groups) is a CT but is refused with
  `UnsupportedSopClassError`, so a scanner sending it gets a clear answer rather than a guess.
- RescaleSlope and RescaleIntercept are Type 1 in the CT Image Module: a file without them is
  refused (MissingAttributeError) instead of defaulting to 1 / 0, because a wrong default
  silently shifts every value by about 1024 HU and the lung window would then see noise.
- Pixel data is decoded by pydicom's own decoders; a compressed transfer syntax without an
  installed decoder (pylibjpeg, gdcm, Pillow) gives `UnsupportedTransferSyntaxError`.
  Uncompressed pixels are decoded in-process (fast, and numpy only reads a bounded buffer);
  compressed ones in a worker process (gateway/decode_pool.py), so a codec that crashes or
  hangs on crafted bytes costs that file an InvalidAttributeError, not the gateway.

Size: one job (one file to one checked slice). It is long because each attribute the analysis
trusts has its own named check, and the decode paths (in-process, in a worker, size guards)
sit beside them.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ctjoint.gateway import decode_pool
from ctjoint.gateway.errors import (
    CtJointError,
    InputError,
    InvalidAttributeError,
    LimitExceededError,
    MissingAttributeError,
    NotCtError,
    NotDicomError,
    UnsupportedSopClassError,
    UnsupportedTransferSyntaxError,
)
from ctjoint.series_rules import is_localizer as rules_is_localizer

logger = logging.getLogger(__name__)

# CT SOP classes we recognise as CT but do not read (multi-frame; geometry lives elsewhere).
_MULTIFRAME_CT_SOP_CLASSES = {
    UID("1.2.840.10008.5.1.4.1.1.2.1"): "Enhanced CT Image Storage",
    UID("1.2.840.10008.5.1.4.1.1.2.2"): "Legacy Converted Enhanced CT Image Storage",
}

# Largest slice we accept: a 4096^2 matrix already exceeds any clinical CT reconstruction, and
# the bound keeps a corrupt Rows/Columns from asking for gigabytes.
MAX_MATRIX = 4096

# Plausibility bounds (docs/security.md): a value outside them is refused with
# INVALID_ARGUMENT naming the attribute and the range, so that nothing absurd (a pixel of
# 1e30 mm, a slope of 1e30) is analysed as if it were real or copied into SEG, SR or the PACS.
# Wide enough for every real CT and for the project's own phantoms, down to 16 x 16 at ~29 mm.
MIN_MATRIX = 16
PIXEL_SPACING_MM = (0.05, 30.0)
# The field of view (Rows x row spacing, Columns x column spacing): a whole body is < 700 mm.
MAX_FIELD_OF_VIEW_MM = 1000.0
SLICE_THICKNESS_MM = (0.1, 20.0)
# HU = slope * stored + intercept; CT scanners write slope 1 (some 0.5 to 2) and an intercept
# of 0, -1000, -1024 or -3024 or so.
RESCALE_SLOPE = (0.01, 100.0)
RESCALE_INTERCEPT = (-10000.0, 10000.0)
# PS3.5 9.1: at most 64 characters, digits in dot-separated components. Leading zeros, which
# the standard forbids but some equipment writes, are let through; anything else (a path, a
# letter) is not.
MAX_UID_CHARS = 64
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")

# What a series volume keeps HU in: int16 when every value is a whole number in its range
# (slope 1 and a whole intercept, as CT scanners store them; half float32's bytes), float32
# otherwise. Both hold the same numbers, so every later step gives the same answer.
HU_INT16: Final = np.dtype(np.int16)
HU_DTYPES: Final = (HU_INT16, np.dtype(np.float32))
_INT16_MIN, _INT16_MAX = int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max)

# Tolerance on the unit length and orthogonality of the direction cosines (scanners write them
# with 6 or so decimals; rounding to that leaves errors around 1e-6).
_COSINE_TOLERANCE = 1e-3

DicomSource = str | os.PathLike[str] | bytes
# Where a slice's HU values go: (rows, columns) -> an int16 or float32 array of that shape,
# or None for a new one (see ct_slice_from_dataset).
HuDestination = Callable[[int, int], "np.ndarray | None"]

# The largest data set a deflated file may inflate to: the largest pixel data we accept
# (4096 x 4096 at 32 bits, 64 MiB) plus room for the header.
MAX_INFLATED_BYTES = 72 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024
# How much of a file is searched for its file meta group (a few hundred bytes in practice).
_META_PROBE_BYTES = 64 * 1024
# Explicit VRs with 2 reserved bytes and a 4-byte length.
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR"}
_LONG_LENGTH_VRS |= {b"UT", b"UV"}


@dataclass(frozen=True, eq=False)
class CtSlice:
    """One validated CT slice: HU pixels plus the geometry and identity needed to assemble it.

    `hu` is [rows, columns] float32, read-only; int16 when it is a row of a series volume kept
    in whole HU (`HU_INT16`). Positions and spacings are in millimetres in the patient
    coordinate system (LPS) of the file.
    """

    hu: np.ndarray
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as DICOM orders it
    slice_thickness: float | None
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_instance_uid: str
    instance_number: int | None
    source: str

    def __post_init__(self) -> None:
        hu = np.ascontiguousarray(self.hu, dtype=hu_dtype(self.hu))
        if hu.ndim != 2:
            raise ValueError(f"a CT slice is 2D, got shape {hu.shape}")
        hu.flags.writeable = False
        object.__setattr__(self, "hu", hu)
        object.__setattr__(self, "position", tuple(float(v) for v in self.position))
        object.__setattr__(self, "orientation", tuple(float(v) for v in self.orientation))
        object.__setattr__(self, "pixel_spacing", tuple(float(v) for v in self.pixel_spacing))

    @property
    def rows(self) -> int:
        return int(self.hu.shape[0])

    @property
    def columns(self) -> int:
        return int(self.hu.shape[1])

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row cosines x column cosines."""
        return slice_normal(self.orientation)


def hu_dtype(hu: np.ndarray) -> type[np.floating] | type[np.signedinteger]:
    """The dtype HU values are kept in: int16 stays int16 (whole HU, half the bytes), anything
    else is float32."""
    return np.int16 if np.asarray(hu).dtype == np.int16 else np.float32


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The normal of an ImageOrientationPatient (cross product of its row and column cosines)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def describe_source(index: int, name: str | None = None) -> str:
    """How errors name a file: 'file 3 (IM00003.dcm)' (1-based, in the order received)."""
    return f"file {index} ({name})" if name else f"file {index}"


def read_ct_slice(
    data: DicomSource, *, source: str | None = None, hu_out: HuDestination | None = None
) -> CtSlice:
    """Parse, validate and decode one DICOM file (a path or its bytes) into a `CtSlice`."""
    if source is None:
        source = "DICOM bytes" if isinstance(data, bytes) else Path(os.fspath(data)).name
    dataset = read_dataset(data, source=source)
    return ct_slice_from_dataset(dataset, source=source, hu_out=hu_out)


def is_localizer(dataset: Dataset) -> bool:
    """Whether an image is a localizer (scout, topogram): CT Image Type value 3 "LOCALIZER".

    Series selection rule: the analysis skips such images (ScanAnalyzer(skip_localizers=...)),
    so a scanner or PACS may send a study's scout with, or inside, the axial series; a stream
    of localizers only is an empty series.
    """
    try:
        image_type = dataset.get("ImageType")
    except Exception:
        # Unparseable: not a localizer; the CT validation that follows names the problem.
        return False
    if image_type is None or isinstance(image_type, DicomSequence):
        return False
    # One value comes back as a plain string, several as a MultiValue; a damaged file may
    # give any other VR's value (a number), which is then one item.
    many = isinstance(image_type, Sequence) and not isinstance(image_type, str | bytes)
    items = list(image_type) if many else [image_type]
    # The rule itself is the series choice's (ctjoint/series_rules.py), one copy for all.
    return rules_is_localizer([str(v) for v in items])


def read_dataset(data: DicomSource, *, source: str, stop_before_pixels: bool = False) -> Dataset:
    """Parse a DICOM Part-10 file (the 'DICM' preamble is required) without validating it."""
    try:
        _check_inflated_size(data, source)
        if isinstance(data, bytes):
            dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
        else:
            dataset = pydicom.dcmread(os.fspath(data), stop_before_pixels=stop_before_pixels)
    except CtJointError:
        raise
    except InvalidDicomError as err:
        raise NotDicomError("not a DICOM Part-10 file (no 'DICM' preamble)", source=source) from err
    except IsADirectoryError as err:
        raise NotDicomError("is a folder, not a DICOM file", source=source) from err
    except OSError as err:
        raise InputError(f"cannot read the file ({err.strerror or err})", source=source) from err
    except Exception as err:
        # pydicom reports truncated or garbled files with a variety of exception types
        # (EOFError, struct.error, ValueError, ...); to the caller they all mean the same.
        raise NotDicomError(f"unreadable DICOM file ({type(err).__name__})", source=source) from err
    if len(dataset) == 0:
        raise NotDicomError(
            "holds no data set after its file meta information (truncated?)", source=source
        )
    return dataset


def _check_inflated_size(data: DicomSource, source: str) -> None:
    """Refuse a Deflated Explicit VR file whose data set inflates past MAX_INFLATED_BYTES.

    pydicom inflates such a data set whole before parsing it, so a file within the gateway's
    size limit could otherwise ask for gigabytes (deflate shrinks zeros ~1000-fold).
    """
    if isinstance(data, bytes):
        head = data[:_META_PROBE_BYTES]
    else:
        with open(os.fspath(data), "rb") as handle:
            head = handle.read(_META_PROBE_BYTES)
    meta_end, syntax = _file_meta_syntax(head)
    if syntax != DeflatedExplicitVRLittleEndian:
        return
    if not isinstance(data, bytes):
        with open(os.fspath(data), "rb") as handle:
            data = handle.read()
    # Inflated a megabyte at a time and thrown away: counting costs no memory. The loop ends
    # when the stream ends (bytes after it, such as pydicom's even-length pad, are ignored),
    # when the limit is passed, or when a call neither consumes input nor yields output
    # (the input ran out before the stream's last block: a truncated file).
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = data[meta_end:], 0
    try:
        while not inflater.eof and total <= MAX_INFLATED_BYTES:
            produced = len(inflater.decompress(pending, _INFLATE_CHUNK))
            consumed = len(pending) - len(inflater.unconsumed_tail)
            pending = inflater.unconsumed_tail
            total += produced
            if produced == 0 and consumed == 0:
                break
    except zlib.error as err:
        raise NotDicomError(f"deflated data set does not inflate ({err})", source=source) from err
    if total > MAX_INFLATED_BYTES:
        raise LimitExceededError(
            f"{source}: its deflated data set inflates to more than {MAX_INFLATED_BYTES} bytes"
        )
    if not inflater.eof:
        raise NotDicomError(
            f"its deflated data set is truncated (the deflate stream stops after {total} "
            "bytes, before its last block)",
            source=source,
        )


def _file_meta_syntax(head: bytes) -> tuple[int, str]:
    """(end of the file meta group, its TransferSyntaxUID) read straight from the bytes; the
    file meta is always explicit VR little endian. (0, "") if there is none."""
    if head[128:132] != b"DICM":
        return 0, ""
    offset, syntax = 132, ""
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            break
        if head[offset + 4 : offset + 6] in _LONG_LENGTH_VRS:
            if offset + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, offset + 8)
            value = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            value = offset + 8
        if element == 0x0010:
            syntax = head[value : value + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = value + length
    return offset, syntax


def ct_slice_from_dataset(
    dataset: Dataset, *, source: str, hu_out: HuDestination | None = None
) -> CtSlice:
    """Validate a parsed dataset as a single-frame CT image and convert its pixels to HU.

    `hu_out(rows, columns)` may give the array the HU values go to (the series volume's next
    slot, `SeriesAssembler.next_slot`): one pass from the stored integers into the volume,
    instead of a new slice array copied there afterwards. An int16 slot takes whole HU only;
    a slice that has others comes back as float32 of its own.
    """
    _check_is_ct(dataset, source)
    rows = _positive_int(dataset, "Rows", source, maximum=MAX_MATRIX, minimum=MIN_MATRIX)
    columns = _positive_int(dataset, "Columns", source, maximum=MAX_MATRIX, minimum=MIN_MATRIX)
    _check_pixel_format(dataset, source)
    spacing = _float_values(dataset, "PixelSpacing", 2, source)
    if not all(v > 0 for v in spacing):
        raise InvalidAttributeError(
            f"must be positive, got {_fmt(spacing)}", source=source, attribute="PixelSpacing"
        )
    _check_range(spacing, PIXEL_SPACING_MM, "PixelSpacing", source, unit=" mm")
    field = max(rows * spacing[0], columns * spacing[1])
    if field > MAX_FIELD_OF_VIEW_MM:
        raise InvalidAttributeError(
            f"gives a field of view of {field:g} mm ({rows}x{columns} pixels of "
            f"{_fmt(spacing)} mm), expected at most {MAX_FIELD_OF_VIEW_MM:g} mm",
            source=source,
            attribute="PixelSpacing",
        )
    position = _float_values(dataset, "ImagePositionPatient", 3, source)
    orientation = _float_values(dataset, "ImageOrientationPatient", 6, source)
    _check_orientation(orientation, source)
    slope = _float_values(dataset, "RescaleSlope", 1, source)[0]
    intercept = _float_values(dataset, "RescaleIntercept", 1, source)[0]
    _check_range([slope], RESCALE_SLOPE, "RescaleSlope", source)
    _check_range([intercept], RESCALE_INTERCEPT, "RescaleIntercept", source)
    thickness = _optional_positive_float(dataset, "SliceThickness", source)
    if thickness is not None:
        _check_range([thickness], SLICE_THICKNESS_MM, "SliceThickness", source, unit=" mm")
    # The destination first: the series' memory budget is checked from Rows and Columns
    # before the pixels are decoded.
    out = hu_out(rows, columns) if hu_out is not None else None
    pixels = _decode_pixels(dataset, rows, columns, source)
    if out is not None and (out.shape != (rows, columns) or out.dtype not in HU_DTYPES):
        out = None
    if out is not None and out.dtype == np.int16:
        whole = _whole_hu_into(out, pixels, slope, intercept)
        if whole is not None:
            return _ct_slice(dataset, whole, source, position, orientation, spacing, thickness)
        # Not whole HU in int16 (a fractional slope or intercept, or out of range): a float32
        # slice of its own, which the assembler's add then takes (widening its volume).
        out = None
    # One pass from the stored integers to float32 HU (the conversion is the first operation,
    # not a separate astype), then the identity-free rest of the rescale.
    if slope != 1.0:
        hu = np.multiply(pixels, np.float32(slope), dtype=np.float32, out=out)
        if intercept != 0.0:
            hu += np.float32(intercept)
    else:
        hu = np.add(pixels, np.float32(intercept), dtype=np.float32, out=out)
    return _ct_slice(dataset, hu, source, position, orientation, spacing, thickness)


def _whole_hu_into(
    out: np.ndarray, pixels: np.ndarray, slope: float, intercept: float
) -> np.ndarray | None:
    """HU into the int16 array `out` when every value is a whole number in int16's range
    (slope 1, a whole intercept: how CT scanners store them), else None with `out` untouched.
    The same numbers as the float32 conversion, in half the bytes."""
    if slope != 1.0 or not float(intercept).is_integer() or pixels.dtype.kind not in "iu":
        return None
    if pixels.size and pixels.dtype.itemsize > 1:
        low, high = int(pixels.min()) + int(intercept), int(pixels.max()) + int(intercept)
        if low < _INT16_MIN or high > _INT16_MAX:
            return None
    # In range, so int16's wrap-around arithmetic gives the exact sum.
    np.add(pixels, np.int16(intercept), out=out, dtype=np.int16, casting="unsafe")
    return out


def _ct_slice(
    dataset: Dataset,
    hu: np.ndarray,
    source: str,
    position: list[float],
    orientation: list[float],
    spacing: list[float],
    thickness: float | None,
) -> CtSlice:
    return CtSlice(
        hu=hu,
        position=(position[0], position[1], position[2]),
        orientation=(
            orientation[0],
            orientation[1],
            orientation[2],
            orientation[3],
            orientation[4],
            orientation[5],
        ),
        pixel_spacing=(spacing[0], spacing[1]),
        slice_thickness=thickness,
        series_uid=_required_uid(dataset, "SeriesInstanceUID", source),
        study_uid=_required_uid(dataset, "StudyInstanceUID", source),
        frame_of_reference_uid=_optional_uid(dataset, "FrameOfReferenceUID", source),
        sop_instance_uid=_required_uid(dataset, "SOPInstanceUID", source),
        instance_number=_optional_int(dataset, "InstanceNumber"),
        source=source,
    )


# --- checks ----------------------------------------------------------------------------------


def _check_is_ct(dataset: Dataset, source: str) -> None:
    modality = str(_get(dataset, "Modality", source) or "").strip()
    if not modality:
        raise MissingAttributeError("is absent or empty", source=source, attribute="Modality")
    if modality != "CT":
        raise NotCtError(
            f"is {modality!r}, expected 'CT' (only CT series can be analysed)",
            source=source,
            attribute="Modality",
        )
    sop_class = _get(dataset, "SOPClassUID", source) or _get(
        dataset.file_meta, "MediaStorageSOPClassUID", source
    )
    if not sop_class:
        raise MissingAttributeError("is absent or empty", source=source, attribute="SOPClassUID")
    sop_class = UID(str(sop_class))
    if sop_class in _MULTIFRAME_CT_SOP_CLASSES:
        raise UnsupportedSopClassError(
            f"is {_MULTIFRAME_CT_SOP_CLASSES[sop_class]} (multi-frame), which is not supported; "
            "send the series as CT Image Storage, one slice per file",
            source=source,
            attribute="SOPClassUID",
        )
    if sop_class != CTImageStorage:
        raise NotCtError(
            f"is {sop_class.name or 'an unknown SOP class'}, expected CT Image Storage",
            source=source,
            attribute="SOPClassUID",
        )
    frames = _optional_int(dataset, "NumberOfFrames", source)
    if frames is not None and frames != 1:
        raise InvalidAttributeError(
            f"is {frames}, expected 1 (one slice per file)",
            source=source,
            attribute="NumberOfFrames",
        )


def _check_pixel_format(dataset: Dataset, source: str) -> None:
    samples = _optional_int(dataset, "SamplesPerPixel", source)
    if samples is not None and samples != 1:
        raise InvalidAttributeError(
            f"is {samples}, expected 1 (greyscale)", source=source, attribute="SamplesPerPixel"
        )
    photometric = str(_get(dataset, "PhotometricInterpretation", source) or "").strip()
    if photometric and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidAttributeError(
            f"is {photometric!r}, expected MONOCHROME2",
            source=source,
            attribute="PhotometricInterpretation",
        )
    bits = _positive_int(dataset, "BitsAllocated", source, maximum=64)
    if bits not in (8, 16, 32):
        raise InvalidAttributeError(
            f"is {bits}, expected 8, 16 or 32", source=source, attribute="BitsAllocated"
        )
    representation = _optional_int(dataset, "PixelRepresentation", source)
    if representation is None:
        raise MissingAttributeError(
            "is absent or empty", source=source, attribute="PixelRepresentation"
        )
    if representation not in (0, 1):
        raise InvalidAttributeError(
            f"is {representation}, expected 0 (unsigned) or 1 (signed)",
            source=source,
            attribute="PixelRepresentation",
        )


def _check_orientation(cosines: list[float], source: str) -> None:
    # Plain float arithmetic: six numbers per file, where numpy's per-call overhead (array
    # creation, norm, dot) cost ~50 us a slice.
    row, col = cosines[:3], cosines[3:]
    unit = abs(math.sqrt(sum(v * v for v in row)) - 1) < _COSINE_TOLERANCE
    unit = unit and abs(math.sqrt(sum(v * v for v in col)) - 1) < _COSINE_TOLERANCE
    if not unit or abs(sum(a * b for a, b in zip(row, col, strict=True))) > _COSINE_TOLERANCE:
        raise InvalidAttributeError(
            f"{_fmt(cosines)} are not two orthogonal unit vectors",
            source=source,
            attribute="ImageOrientationPatient",
        )


def _decode_pixels(dataset: Dataset, rows: int, columns: int, source: str) -> np.ndarray:
    if "PixelData" not in dataset or not _get(dataset, "PixelData", source):
        raise MissingAttributeError(
            "is absent (the file carries no image)", source=source, attribute="PixelData"
        )
    syntax = _get(dataset.file_meta, "TransferSyntaxUID", source)
    if not syntax:
        raise MissingAttributeError(
            "is absent from the file meta information", source=source, attribute="TransferSyntaxUID"
        )
    syntax = UID(str(syntax))
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError as err:
        raise UnsupportedTransferSyntaxError(
            f"transfer syntax {syntax.name or syntax} has no pixel data decoder", source=source
        ) from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise UnsupportedTransferSyntaxError(
            f"transfer syntax {syntax.name} needs a decoder that is not installed ({missing})",
            source=source,
        )
    if not syntax.is_compressed:
        # Checked before decoding so a truncated file gets a size message, not a numpy one.
        bits = int(_get(dataset, "BitsAllocated", source))
        expected = rows * columns * bits // 8
        actual = len(dataset.PixelData)
        if actual < expected:
            raise InvalidAttributeError(
                f"holds {actual} bytes, expected {expected} for {rows}x{columns} at {bits} bits",
                source=source,
                attribute="PixelData",
            )
    if syntax.is_compressed:
        pixels = _decode_in_worker(dataset, syntax, rows, columns, source)
    elif (plain := _plain_pixels(dataset, syntax, rows, columns)) is not None:
        pixels = plain
    else:
        try:
            pixels = dataset.pixel_array
        except Exception as err:
            # Decoders raise whatever their library raises; all of it means "cannot decode".
            raise InvalidAttributeError(
                f"cannot be decoded ({type(err).__name__}: {err})",
                source=source,
                attribute="PixelData",
            ) from err
    if pixels.shape != (rows, columns):
        raise InvalidAttributeError(
            f"decodes to shape {pixels.shape}, expected ({rows}, {columns})",
            source=source,
            attribute="PixelData",
        )
    return pixels


_PLAIN_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_PLAIN_DTYPES = {(16, 0): np.dtype("<u2"), (16, 1): np.dtype("<i2")}


def _plain_pixels(dataset: Dataset, syntax: UID, rows: int, columns: int) -> np.ndarray | None:
    """The common CT case read straight from the bytes: one frame of little-endian 16-bit
    pixels with every allocated bit stored. A zero-copy view, against ~0.2 ms per 512x512
    slice for pydicom's general decoder; None (use pydicom) for anything else, including
    BitsStored < BitsAllocated, whose unused high bits pydicom knows how to treat."""
    if syntax not in _PLAIN_SYNTAXES:
        return None
    try:
        bits = int(_known_value(dataset, "BitsAllocated"))
        key = (bits, int(_known_value(dataset, "PixelRepresentation")))
        if int(_known_value(dataset, "BitsStored") or 0) != bits or key not in _PLAIN_DTYPES:
            return None
    except Exception:
        # A malformed value (any of pydicom's lazy-conversion errors): the general path
        # reads it again through _get and names it.
        return None
    data = dataset.PixelData
    count = rows * columns
    if not isinstance(data, bytes) or len(data) < count * 2:
        return None
    return np.frombuffer(data, dtype=_PLAIN_DTYPES[key], count=count).reshape(rows, columns)


def _decode_in_worker(
    dataset: Dataset, syntax: UID, rows: int, columns: int, source: str
) -> np.ndarray:
    """Compressed pixel data goes through a codec (C code fed with untrusted bytes): decode it
    in a worker process so a codec crash, hang or memory bomb costs this file only."""
    attributes = {}
    for keyword in decode_pool.PIXEL_ATTRIBUTES:
        value = _get(dataset, keyword, source)
        if value is not None and value != "":
            attributes[keyword] = int(value) if isinstance(value, int) else str(value)
    try:
        pixel_data = bytes(dataset.PixelData)
    except Exception as err:
        raise InvalidAttributeError(
            f"cannot be read ({type(err).__name__})", source=source, attribute="PixelData"
        ) from err
    _check_codestream_size(pixel_data, rows, columns, source)
    request = decode_pool.DecodeRequest(str(syntax), attributes, pixel_data)
    try:
        return decode_pool.default_pool().decode(request)
    except decode_pool.DecodeError as err:
        raise InvalidAttributeError(
            f"cannot be decoded as {syntax.name} ({err})", source=source, attribute="PixelData"
        ) from err


# --- attribute access ------------------------------------------------------------------------


# The attributes the CT checks read on every file, by keyword: their tag and VR. Their raw
# bytes are read directly (`_raw_value`); pydicom's general conversion of the same ~20 values
# (VR lookups, validation, MultiValue wrappers) cost ~0.4 ms of the ~1 ms a 512x512 file took.
_RAW_VRS: Final = {
    "Modality": "CS",
    "SOPClassUID": "UI",
    "NumberOfFrames": "IS",
    "Rows": "US",
    "Columns": "US",
    "SamplesPerPixel": "US",
    "PhotometricInterpretation": "CS",
    "BitsAllocated": "US",
    "BitsStored": "US",
    "PixelRepresentation": "US",
    "PixelSpacing": "DS",
    "ImagePositionPatient": "DS",
    "ImageOrientationPatient": "DS",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
    "SliceThickness": "DS",
    "SeriesInstanceUID": "UI",
    "StudyInstanceUID": "UI",
    "FrameOfReferenceUID": "UI",
    "SOPInstanceUID": "UI",
    "InstanceNumber": "IS",
}
_RAW_TAGS: Final = {keyword: tag_for_keyword(keyword) for keyword in _RAW_VRS}
# "Not read here, ask pydicom": distinct from None, which means absent.
_ASK_PYDICOM: Final = object()


def _raw_value(dataset: Dataset, keyword: str) -> Any:
    """The value of one of the _RAW_VRS attributes read straight from its element's bytes,
    None when absent, or _ASK_PYDICOM for anything but the plain case (already converted,
    another VR than the dictionary's, big endian, empty, several US values, non-ASCII text):
    then pydicom converts it and its errors name the problem, exactly as before.

    Text comes back as pydicom would return it to the checks: one value as a stripped str,
    several as a list of them (DS and IS stay text; the callers convert and check them).
    """
    tag = _RAW_TAGS.get(keyword)
    if tag is None:
        return _ASK_PYDICOM
    element = dataset.get_item(tag, keep_deferred=True)
    if element is None:
        return None
    if not isinstance(element, RawDataElement) or not element.is_little_endian:
        return _ASK_PYDICOM
    vr = _RAW_VRS[keyword]
    data = element.value
    if element.VR not in (vr, None) or not isinstance(data, bytes) or not data:
        return _ASK_PYDICOM
    if vr == "US":
        return int.from_bytes(data, "little") if len(data) == 2 else _ASK_PYDICOM
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return _ASK_PYDICOM
    values = [v.strip(" \0") for v in text.split("\\")]
    return values[0] if len(values) == 1 else values


# JPEG start-of-frame markers (baseline ... lossless, arithmetic; not DHT C4, JPG C8, DAC CC)
# and JPEG-LS's SOF55: each followed by length, precision, height, width.
_SOF_MARKERS: Final = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
# Markers that stand alone (no length): TEM, RSTn, SOI, EOI.
_STANDALONE_MARKERS: Final = frozenset({0x01, *range(0xD0, 0xDA)})
# How far into the first fragment a frame header is looked for.
_HEADER_SCAN_BYTES: Final = 64 * 1024


def _check_codestream_size(pixel_data: bytes, rows: int, columns: int, source: str) -> None:
    """Refuse compressed pixels whose own header declares another image size than Rows x
    Columns, before a codec decodes them.

    A codec decodes what its header says, however large: a fuzzed JPEG-LS header of 3824 x
    3824 took a worker 4.6 s to decode into an array that was then refused anyway. JPEG,
    JPEG-LS (SOFn) and JPEG 2000 (SIZ) headers are read; RLE needs nothing (its decoder
    fills exactly Rows x Columns), and a header this does not find is left to the codec.
    """
    try:
        items = generate_fragments(pixel_data)
        next(items, b"")  # the Basic Offset Table item, always first
        fragment = next(items, b"")
    except Exception:
        return  # malformed encapsulation: the decoder names it
    if len(fragment) < 4:
        return
    head = bytes(fragment[:_HEADER_SCAN_BYTES])
    size = _jpeg_frame_size(head) if head[:2] == b"\xff\xd8" else None
    if head[:4] == b"\xff\x4f\xff\x51" and len(head) >= 28:
        # J2K: SOC, then SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz (32-bit each after Rsiz).
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", head, 8)
        size = (ysiz - yosiz, xsiz - xosiz)
    if size is not None and size != (rows, columns):
        raise InvalidAttributeError(
            f"its codestream is {size[0]}x{size[1]}, Rows x Columns say {rows}x{columns}",
            source=source,
            attribute="PixelData",
        )


def _jpeg_frame_size(head: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG or JPEG-LS start-of-frame segment; None if not found
    (or a height of 0, which a later DNL segment defines)."""
    offset = 2
    while offset + 4 <= len(head):
        if head[offset] != 0xFF:
            return None
        marker = head[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in _STANDALONE_MARKERS:
            offset += 2
            continue
        (length,) = struct.unpack_from(">H", head, offset + 2)
        if marker in _SOF_MARKERS:
            if offset + 9 > len(head):
                return None
            height, width = struct.unpack_from(">HH", head, offset + 5)
            return (height, width) if height else None
        if marker == 0xDA or length < 2:  # start of scan: no frame header before it
            return None
        offset += 2 + length
    return None


def _known_value(dataset: Dataset, keyword: str) -> Any:
    """`_raw_value`, else pydicom's `get` (which may raise: for callers that catch)."""
    value = _raw_value(dataset, keyword)
    return dataset.get(keyword) if value is _ASK_PYDICOM else value


def _get(dataset: Dataset, keyword: str, source: str) -> Any:
    """`dataset.get(keyword)`, with a malformed value reported as the attribute's fault.

    pydicom converts raw values lazily, so a bad VR, an odd length or undecodable bytes only
    fail on access, each with its own exception type (NotImplementedError, BytesLengthException,
    ValueError, ...).
    """
    value = _raw_value(dataset, keyword)
    if value is not _ASK_PYDICOM:
        return value
    try:
        value = dataset.get(keyword)
    except Exception as err:
        raise InvalidAttributeError(
            f"cannot be parsed ({type(err).__name__})", source=source, attribute=keyword
        ) from err
    if isinstance(value, DicomSequence | Dataset):
        # A damaged file can give any tag VR SQ; its items hold lazily parsed elements that
        # fail on str(), so a sequence never reaches the callers, which expect plain values.
        raise InvalidAttributeError(
            "is a sequence, expected a plain value", source=source, attribute=keyword
        )
    return value


def _element_value(dataset: Dataset, keyword: str, source: str) -> Any:
    value = _get(dataset, keyword, source)
    if value is None or (isinstance(value, str | bytes | list) and len(value) == 0):
        raise MissingAttributeError("is absent or empty", source=source, attribute=keyword)
    return value


def _float_values(dataset: Dataset, keyword: str, count: int, source: str) -> list[float]:
    value = _element_value(dataset, keyword, source)
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError) as err:
        raise InvalidAttributeError(
            "holds a value that is not a number", source=source, attribute=keyword
        ) from err
    if len(numbers) != count:
        raise InvalidAttributeError(
            f"has {len(numbers)} values, expected {count}", source=source, attribute=keyword
        )
    if not all(math.isfinite(v) for v in numbers):
        raise InvalidAttributeError(
            f"holds a non-finite value {_fmt(numbers)}", source=source, attribute=keyword
        )
    return numbers


def _positive_int(
    dataset: Dataset, keyword: str, source: str, *, maximum: int, minimum: int = 1
) -> int:
    value = _element_value(dataset, keyword, source)
    try:
        number = int(value)
    except (TypeError, ValueError) as err:
        raise InvalidAttributeError("is not an integer", source=source, attribute=keyword) from err
    if not minimum <= number <= maximum:
        raise InvalidAttributeError(
            f"is {number}, expected {minimum}..{maximum}", source=source, attribute=keyword
        )
    return number


def _check_range(
    values: Sequence[float],
    bounds: tuple[float, float],
    keyword: str,
    source: str,
    *,
    unit: str = "",
) -> None:
    """Refuse a value outside its plausibility bounds, naming the attribute and the range."""
    low, high = bounds
    if not all(low <= v <= high for v in values):
        shown = _fmt(values) if len(values) > 1 else f"{values[0]:g}"
        raise InvalidAttributeError(
            f"is {shown}{unit}, outside the plausible range {low:g} to {high:g}{unit}",
            source=source,
            attribute=keyword,
        )


def _optional_int(dataset: Dataset, keyword: str, source: str | None = None) -> int | None:
    """An optional integer; with `source`, a value that is present but unusable is an error
    (the pixel module's attributes), without it, ignored (InstanceNumber)."""
    try:
        value = _known_value(dataset, keyword)
        return None if value is None or value == "" else int(value)
    except Exception as err:
        if source is None:
            return None
        raise InvalidAttributeError("is not an integer", source=source, attribute=keyword) from err


def _optional_positive_float(dataset: Dataset, keyword: str, source: str) -> float | None:
    try:
        value = _known_value(dataset, keyword)
        number = None if value is None or value == "" else float(value)
    except Exception:
        logger.warning("%s: %s is not a number; ignored", source, keyword)
        return None
    if number is not None and not (math.isfinite(number) and number > 0):
        logger.warning("%s: %s is not a positive number; ignored", source, keyword)
        return None
    return number


def _required_uid(dataset: Dataset, keyword: str, source: str) -> str:
    value = str(_element_value(dataset, keyword, source)).strip()
    if not value:
        raise MissingAttributeError("is absent or empty", source=source, attribute=keyword)
    return _valid_uid(value, keyword, source)


def _valid_uid(value: str, keyword: str, source: str) -> str:
    """A UID goes into SEG, SR and the PACS: it must be one (never quoted back: it may
    identify the study)."""
    if len(value) > MAX_UID_CHARS or not _UID_RE.fullmatch(value):
        raise InvalidAttributeError(
            f"is not a valid UID (expected at most {MAX_UID_CHARS} characters of digits in "
            "dot-separated components)",
            source=source,
            attribute=keyword,
        )
    return value


def _optional_uid(dataset: Dataset, keyword: str, source: str) -> str:
    value = str(_get(dataset, keyword, source) or "").strip()
    return _valid_uid(value, keyword, source) if value else ""


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
