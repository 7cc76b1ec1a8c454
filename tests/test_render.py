"""Client-side rendering: the PNG encoder, the montage, the summary and the JSON file."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from ctjoint.client.render import (
    LEGEND,
    LUNG_OUTLINE,
    choose_slices,
    encode_png,
    format_summary,
    text_mask,
    write_overlay_png,
    write_result_json,
)

RESULT = {
    "label": "cap",
    "probabilities": {"covid19": 0.2, "cap": 0.7, "normal": 0.1},
    "lesions": {
        "classes": {
            "ground_glass": {"voxels": 10, "volume_ml": 1.25},
            "consolidation": {"voxels": 90, "volume_ml": 11.5},
        },
        "total": {"voxels": 100, "volume_ml": 12.75},
        "slice_pixels": {"ground_glass": [0, 4, 6], "consolidation": [0, 0, 90]},
    },
    "series": {"slices": 3, "rows": 8, "columns": 8, "spacing_mm": [2.5, 0.7, 0.7]},
    "model": {"name": "jcs2d", "version": "1"},
    "backend": "embedded-onnxruntime",
    "timings": {"read_ms": 5.0, "infer_ms": 20.0, "total_ms": 40.0},
}


def decode_png(data: bytes) -> np.ndarray:
    """A minimal PNG reader for what encode_png writes (8-bit grey/RGB, filters 0 and 1)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF, kind
        chunks[kind] = chunks.get(kind, b"") + payload
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8
    channels = {0: 1, 2: 3}[colour]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8)
    raw = raw.reshape(height, width * channels + 1)
    rows = raw[:, 1:].astype(np.int64)
    for y in range(height):
        if raw[y, 0] == 1:
            for x in range(channels, width * channels):
                rows[y, x] = (rows[y, x] + rows[y, x - channels]) % 256
    shape = (height, width) if channels == 1 else (height, width, 3)
    return rows.astype(np.uint8).reshape(shape)


@pytest.mark.parametrize("shape", [(7, 5), (6, 9, 3)])
def test_png_round_trips(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(2).integers(0, 256, shape).astype(np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(image)), image)


def test_overlay_colours_lesions_and_windows_the_lung(tmp_path: Path) -> None:
    hu = np.full((3, 8, 8), -1350.0, dtype=np.float32)  # bottom of the lung window: black
    labels = np.zeros((3, 8, 8), dtype=np.uint8)
    labels[1, 2:4, 2:4] = 2
    chosen = write_overlay_png(hu, labels, tmp_path / "o.png", tiles=12, legend=False)
    image = decode_png((tmp_path / "o.png").read_bytes())
    assert chosen == [0, 1, 2]
    assert image.shape == (8, 3 * 8 + 2 * 4, 3)
    assert tuple(image[0, 0]) == (0, 0, 0)
    red, green, _ = image[2, 8 + 4 + 2]  # slice 1 is the second tile
    assert red > 100 and green < 40


def test_slices_with_most_lesion_are_chosen_then_spread() -> None:
    pixels = np.zeros(100, dtype=np.int64)
    pixels[50] = 500
    pixels[51] = 400  # too close to 50 to be shown too
    pixels[80] = 300
    chosen = choose_slices(pixels, tiles=6)
    assert len(chosen) == 6 and chosen == sorted(chosen)
    assert 50 in chosen and 80 in chosen and 51 not in chosen


def test_summary_names_label_probabilities_volumes_and_timings() -> None:
    text = format_summary(RESULT)
    assert "cap (community-acquired pneumonia), p = 0.700" in text
    assert "consolidation 11.5 mL" in text and "total 12.8 mL, on 2 of 3 slices" in text
    assert "infer 20" in text


def test_json_is_written_with_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "result.json"
    write_result_json(RESULT, path)
    assert json.loads(path.read_text()) == RESULT


def test_overlay_has_a_legend_and_outlines_the_lungs(tmp_path: Path) -> None:
    hu = np.full((2, 16, 16), -1350.0, dtype=np.float32)
    labels = np.zeros((2, 16, 16), dtype=np.uint8)
    lungs = np.zeros((2, 16, 16), dtype=np.uint8)
    lungs[:, 4:12, 4:12] = 1
    write_overlay_png(hu, labels, tmp_path / "o.png", lung_map=lungs)
    image = decode_png((tmp_path / "o.png").read_bytes())
    assert image.shape[0] > 16  # the legend strip below the tiles
    assert tuple(image[4, 4]) == LUNG_OUTLINE and tuple(image[8, 8]) == (0, 0, 0)
    legend = image[16:]
    for _, colour in LEGEND:
        assert (legend == colour).all(axis=2).any(), colour
    ink = text_mask("LUNG")
    assert ink.any() and ink.shape[0] == 14
