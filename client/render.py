"""Render a scan result for people: a text summary, the JSON file, an overlay montage PNG.

Numpy and the standard library only (the scanner-side client installs without matplotlib or
Pillow), so the PNG is written by a small encoder here. Results are taken as the JSON-ready
dict that `ScanResult.to_dict()` returns (the client rebuilds the same dict from the gRPC
answer), or as any object with a `to_dict()` method.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ctjoint.contracts import CLASS_NAMES, SEG_CONSOLIDATION, SEG_GROUND_GLASS

# Lung window (centre -600, width 1500 HU), the window the models see.
WINDOW_LOW_HU = -1350.0
WINDOW_WIDTH_HU = 1500.0
# Overlay colours (RGB) and opacity per lesion class: ground-glass amber, consolidation red.
OVERLAY = {
    SEG_GROUND_GLASS: ((255, 190, 0), 0.45),
    SEG_CONSOLIDATION: ((235, 40, 40), 0.55),
}
# Lung outline (from the gateway's lung segmentation), drawn over the lesion colours.
LUNG_OUTLINE = (60, 200, 255)
LEGEND = (
    ("GROUND-GLASS", OVERLAY[SEG_GROUND_GLASS][0]),
    ("CONSOLIDATION", OVERLAY[SEG_CONSOLIDATION][0]),
    ("LUNG", LUNG_OUTLINE),
)
# Class activation map: a magenta tint whose opacity follows the map (0 none, 255 strongest).
CAM_COLOUR = (255, 0, 220)
CAM_MAX_ALPHA = 0.6
MONTAGE_TILES = 12
MONTAGE_COLUMNS = 4
MAX_TILE_PIXELS = 256
TILE_GAP = 4

_CLASS_TITLES = {"covid19": "COVID-19 pneumonia", "cap": "community-acquired pneumonia"}
_CLASS_TITLES["normal"] = "no pneumonia"


class HasToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


ResultLike = Mapping[str, Any] | HasToDict


def as_result_dict(result: ResultLike) -> Mapping[str, Any]:
    """The JSON-ready dict of a result given as a dict or an object with `to_dict()`."""
    if isinstance(result, Mapping):
        return result
    return result.to_dict()


# --- text ------------------------------------------------------------------------------------


def format_summary(result: ResultLike) -> str:
    """A short human-readable summary: label, probabilities, lesion volumes, timings."""
    data = as_result_dict(result)
    probabilities: Mapping[str, float] = data.get("probabilities", {})
    label = str(data.get("label", "?"))
    lines = [
        f"Label:         {label} ({_CLASS_TITLES.get(label, label)}), "
        f"p = {probabilities.get(label, float('nan')):.3f}",
        "Probabilities: "
        + "  ".join(f"{name} {probabilities.get(name, float('nan')):.3f}" for name in CLASS_NAMES),
    ]
    review = data.get("review") or {}
    if review:
        lines.append(
            "Review:        "
            + ("needed: " + "; ".join(review.get("details") or review.get("reasons") or ()))
            if review.get("needed")
            else "Review:        not flagged"
        )
    for member in data.get("members") or ():
        member_probs = member.get("probabilities") or {}
        member_label = str(member.get("label"))
        flag = "review" if (member.get("review") or {}).get("needed") else "no flag"
        lines.append(
            f"  {(member.get('model') or {}).get('name')}: {member_label} "
            f"p = {member_probs.get(member_label, float('nan')):.3f}, "
            f"lesions {member.get('lesion_volume_ml', 0.0):.1f} mL, {flag}"
        )
    lesions = data.get("lesions") or {}
    classes = lesions.get("classes") or {}
    if classes:
        parts = [
            f"{name.replace('_', '-')} {stats.get('volume_ml', 0.0):.1f} mL"
            for name, stats in classes.items()
        ]
        total = (lesions.get("total") or {}).get("volume_ml", 0.0)
        slice_pixels = lesions.get("slice_pixels") or {}
        per_slice = [sum(vals) for vals in zip(*slice_pixels.values(), strict=True)]
        involved = sum(1 for v in per_slice if v > 0)
        where = f", on {involved} of {len(per_slice)} slices" if per_slice else ""
        lines.append(f"Lesions:       {', '.join(parts)}; total {total:.1f} mL{where}")
    quantification = data.get("quantification") or {}
    lungs = quantification.get("lungs") or {}
    if lungs:
        sides = "  ".join(
            f"{side} {lung.get('volume_ml', 0.0):.0f} mL ({lung.get('percent_involved', 0.0):.1f}%"
            " involved)"
            for side, lung in lungs.items()
        )
        lines.append(f"Lungs:         {sides}")
        extent = "bilateral" if quantification.get("bilateral") else "not bilateral"
        lines.append(
            f"Distribution:  {extent}, {quantification.get('distribution')} "
            f"(peripheral {quantification.get('peripheral_fraction', 0.0):.0%}), "
            f"severity {quantification.get('severity_score')}/30"
        )
    series = data.get("series") or {}
    if series:
        spacing = " x ".join(f"{v:.2f}" for v in series.get("spacing_mm", ()))
        lines.append(
            f"Series:        {series.get('slices')} slices of "
            f"{series.get('rows')}x{series.get('columns')}, spacing {spacing} mm"
        )
    model = data.get("model") or {}
    if model:
        lines.append(
            f"Model:         {model.get('name')} {model.get('version')} on {data.get('backend')}"
        )
    timings = data.get("timings") or {}
    if timings:
        stages = ("read", "validate", "preprocess", "infer", "postprocess", "total")
        lines.append(
            "Timings (ms):  "
            + "  ".join(f"{s} {timings[f'{s}_ms']:.0f}" for s in stages if f"{s}_ms" in timings)
        )
    return "\n".join(lines)


def write_result_json(result: ResultLike, path: Path) -> None:
    """Write the result as indented JSON (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_result_dict(result), indent=2) + "\n", encoding="utf-8")


# --- overlay montage -------------------------------------------------------------------------


def write_overlay_png(
    volume_hu: np.ndarray,
    label_map: np.ndarray,
    path: Path,
    *,
    tiles: int = MONTAGE_TILES,
    columns: int = MONTAGE_COLUMNS,
    lung_map: np.ndarray | None = None,
    cam: np.ndarray | Callable[[list[int]], np.ndarray] | None = None,
    legend: bool = True,
    caption: str | None = None,
) -> list[int]:
    """Write a montage of up to `tiles` slices, lung window with lesions coloured, as PNG.

    Slices are those with the most lesion (kept apart so neighbours do not fill the montage),
    topped up with evenly spread slices. With `lung_map` (same shape, >0 inside a lung) the
    lungs are outlined; with `cam` (uint8 [Z, Y, X], or a callable giving those slices for
    a list of indices) the class activation map tints the slices under the lesion colours;
    `legend` adds a strip below naming each colour; `caption` (the review line, e.g.
    "REVIEW - LOW CONFIDENCE") a line of text under it. Returns the chosen slice indices
    (ascending).
    """
    volume_hu = np.asarray(volume_hu)
    label_map = np.asarray(label_map)
    if volume_hu.ndim != 3 or volume_hu.shape != label_map.shape:
        raise ValueError(
            f"volume {volume_hu.shape} and label map {label_map.shape} must be the same [Z,Y,X]"
        )
    if lung_map is not None and np.shape(lung_map) != label_map.shape:
        raise ValueError(f"lung map {np.shape(lung_map)} must match the label map")
    chosen = choose_slices(np.count_nonzero(label_map, axis=(1, 2)), tiles)
    factor = max(1, math.ceil(max(volume_hu.shape[1:]) / MAX_TILE_PIXELS))
    heat = None
    if cam is not None:
        heat = np.asarray(cam(chosen) if callable(cam) else np.asarray(cam)[chosen])
        if heat.shape != (len(chosen), *label_map.shape[1:]):
            raise ValueError(f"cam slices {heat.shape} do not match the label map")
    rendered = [
        _render_tile(
            volume_hu[z],
            label_map[z],
            factor,
            None if lung_map is None else lung_map[z] > 0,
            None if heat is None else heat[i],
        )
        for i, z in enumerate(chosen)
    ]
    image = _montage(rendered, columns)
    if legend:
        entries = list(LEGEND if lung_map is not None else LEGEND[:2])
        if heat is not None:
            entries.append(("CAM", CAM_COLOUR))
        image = _with_legend(image, tuple(entries))
    if caption:
        image = _with_caption(image, caption)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return chosen


def choose_slices(lesion_pixels: np.ndarray, tiles: int) -> list[int]:
    """Indices of up to `tiles` slices: most lesion first, spaced apart, then evenly spread."""
    count = len(lesion_pixels)
    if count <= tiles:
        return list(range(count))
    min_gap = max(1, count // (2 * tiles))
    chosen: list[int] = []
    for z in np.argsort(-lesion_pixels, kind="stable"):
        if lesion_pixels[z] <= 0 or len(chosen) == tiles:
            break
        if all(abs(int(z) - c) >= min_gap for c in chosen):
            chosen.append(int(z))
    for z in np.linspace(0, count - 1, tiles).round().astype(int):
        if len(chosen) == tiles:
            break
        if all(abs(int(z) - c) >= min_gap for c in chosen):
            chosen.append(int(z))
    # Close gaps can leave the montage short; fill it with any remaining slices.
    for z in range(count):
        if len(chosen) == tiles:
            break
        if z not in chosen:
            chosen.append(z)
    return sorted(chosen)


def _render_tile(
    hu: np.ndarray,
    labels: np.ndarray,
    factor: int,
    lungs: np.ndarray | None = None,
    heat: np.ndarray | None = None,
) -> np.ndarray:
    """One slice as RGB uint8, reduced by `factor` (grey by block mean, labels by block max)."""
    if factor > 1:
        y = hu.shape[0] // factor * factor
        x = hu.shape[1] // factor * factor
        blocks = (y // factor, factor, x // factor, factor)
        hu = hu[:y, :x].reshape(blocks).mean(axis=(1, 3))
        labels = labels[:y, :x].reshape(blocks).max(axis=(1, 3))
        if lungs is not None:
            lungs = lungs[:y, :x].reshape(blocks).max(axis=(1, 3))
        if heat is not None:
            heat = heat[:y, :x].reshape(blocks).mean(axis=(1, 3))
    grey = np.clip((hu.astype(np.float32) - WINDOW_LOW_HU) / WINDOW_WIDTH_HU, 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if heat is not None:
        tint = (np.asarray(heat, dtype=np.float32) / 255.0 * CAM_MAX_ALPHA)[..., None]
        rgb = (1.0 - tint) * rgb + tint * np.asarray(CAM_COLOUR, dtype=np.float32)
    for value, (colour, alpha) in OVERLAY.items():
        mask = labels == value
        if mask.any():
            rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * np.asarray(colour, dtype=np.float32)
    if lungs is not None and lungs.any():
        rgb[_outline(lungs)] = LUNG_OUTLINE
    return np.round(rgb).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the image edge counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


# A 5x7 bitmap font of our own: the letters, the hyphen and the space the legend and the
# review caption need ("#" is ink). The client installs without Pillow.
_GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "#####"),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "##.##", "#...#"),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    " ": (".....", ".....", ".....", ".....", ".....", ".....", "....."),
}
_GLYPH_W, _GLYPH_H = 5, 7
LEGEND_SCALE = 2
LEGEND_PAD = 6


def text_mask(text: str, scale: int = LEGEND_SCALE) -> np.ndarray:
    """Boolean [7*scale, 6*len*scale] ink of `text` in the legend font (one column apart)."""
    columns = []
    for char in text.upper():
        glyph = _GLYPHS.get(char)
        if glyph is None:
            raise ValueError(f"the legend font has no {char!r}")
        cell = np.array([[c == "#" for c in row] for row in glyph], dtype=bool)
        columns.append(np.pad(cell, ((0, 0), (0, 1))))
    ink = np.concatenate(columns, axis=1) if columns else np.zeros((_GLYPH_H, 0), dtype=bool)
    return np.kron(ink, np.ones((scale, scale), dtype=bool)).astype(bool)


def _with_legend(
    image: np.ndarray, entries: tuple[tuple[str, tuple[int, int, int]], ...]
) -> np.ndarray:
    """The montage with a strip below it: a colour swatch and a name per entry."""
    height = _GLYPH_H * LEGEND_SCALE
    swatch = height
    pieces: list[np.ndarray] = []
    for name, colour in entries:
        ink = text_mask(name)
        piece = np.full(
            (height, swatch + LEGEND_PAD + ink.shape[1] + 2 * LEGEND_PAD, 3), 32, np.uint8
        )
        piece[:, :swatch] = colour
        text = piece[:, swatch + LEGEND_PAD : swatch + LEGEND_PAD + ink.shape[1]]
        text[ink] = 230
        pieces.append(piece)
    row = np.concatenate(pieces, axis=1)
    width = max(image.shape[1], row.shape[1])
    out = np.full((image.shape[0] + height + 2 * LEGEND_PAD, width, 3), 32, dtype=np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    top = image.shape[0] + LEGEND_PAD
    out[top : top + height, : row.shape[1]] = row
    return out


def _with_caption(image: np.ndarray, caption: str) -> np.ndarray:
    """The image with a line of text below it: amber when it asks for review, grey otherwise."""
    ink = text_mask(caption)
    colour = (255, 190, 0) if caption.startswith("REVIEW") else (200, 200, 200)
    height = ink.shape[0] + 2 * LEGEND_PAD
    width = max(image.shape[1], ink.shape[1] + 2 * LEGEND_PAD)
    out = np.full((image.shape[0] + height, width, 3), 32, dtype=np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    line = out[image.shape[0] + LEGEND_PAD : image.shape[0] + LEGEND_PAD + ink.shape[0]]
    line[:, LEGEND_PAD : LEGEND_PAD + ink.shape[1]][ink] = colour
    return out


def _montage(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    canvas = np.full(
        (rows * height + (rows - 1) * TILE_GAP, columns * width + (columns - 1) * TILE_GAP, 3),
        32,
        dtype=np.uint8,
    )
    for i, tile in enumerate(tiles):
        top = (i // columns) * (height + TILE_GAP)
        left = (i % columns) * (width + TILE_GAP)
        canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    return canvas


# --- PNG -------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(image: np.ndarray) -> bytes:
    """Encode an 8-bit greyscale [H, W] or RGB [H, W, 3] image as PNG bytes.

    Each row uses PNG filter 1 ("Sub": difference to the pixel on the left), which CT images
    compress far better with than unfiltered rows, and costs one vectorised subtraction.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        colour_type, channels = 0, 1
    elif image.ndim == 3 and image.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"expected [H, W] or [H, W, 3] uint8, got shape {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError("cannot encode an empty image")
    rows = image.reshape(height, width * channels)
    filtered = rows.copy()
    filtered[:, channels:] = rows[:, channels:] - rows[:, :-channels]  # uint8 wraps mod 256
    raw = np.empty((height, width * channels + 1), dtype=np.uint8)
    raw[:, 0] = 1
    raw[:, 1:] = filtered
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"".join(
        [
            _PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)),
            _chunk(b"IEND", b""),
        ]
    )


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)
