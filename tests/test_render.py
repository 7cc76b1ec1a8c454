"""Rendering: the overlay montage (ctjoint.render, Pillow), the summary and the JSON file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ctjoint.client.render import format_summary, write_overlay_png, write_result_json
from ctjoint.render import (
    CAPTION_REVIEW,
    LEGEND,
    LUNG_OUTLINE,
    choose_slices,
    render_overlay,
    text_strip_height,
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
    """The pixels of a PNG file, read by Pillow as any viewer would."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


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
    # The names are written beside the swatches in the legend's light text colour.
    assert image.shape[0] == 16 + text_strip_height()
    assert (legend.min(axis=2) > 200).sum() > 20


def test_the_overlay_bytes_are_a_png_and_the_file_writer_writes_them(tmp_path: Path) -> None:
    hu = np.full((4, 16, 16), -600.0, dtype=np.float32)
    labels = np.zeros((4, 16, 16), dtype=np.uint8)
    labels[2, 5:9, 5:9] = 1
    overlay = render_overlay(hu, labels, tiles=2, legend=False)
    assert overlay.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert overlay.slices == (0, 2)  # the lesion slice, then the first of the even spread
    chosen = write_overlay_png(hu, labels, tmp_path / "a" / "o.png", tiles=2, legend=False)
    assert chosen == [0, 2]
    assert (tmp_path / "a" / "o.png").read_bytes() == overlay.png


def test_a_review_caption_is_drawn_in_amber_below_the_montage() -> None:
    hu = np.full((2, 16, 16), -1350.0, dtype=np.float32)
    labels = np.zeros((2, 16, 16), dtype=np.uint8)
    image = decode_png(render_overlay(hu, labels, legend=False, caption="REVIEW - ok").png)
    assert image.shape[0] == 16 + text_strip_height()
    strip = image[16:]
    assert (strip == CAPTION_REVIEW).all(axis=2).any()
    assert (image[:16, :16] == 0).all()  # the montage above it is untouched
