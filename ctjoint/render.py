"""The overlay montage of a scan, as PNG bytes: lung window, lesions coloured, lungs outlined,
the class activation map tinted, a legend and the review caption.

Neutral ground (docs/architecture.md): the gateway draws it into an answer, the client and
`ctjoint analyze` write it to a file; neither imports the other for it. The slices are
composed with numpy; Pillow writes the text and encodes the PNG.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctjoint.contracts import SEG_CONSOLIDATION, SEG_GROUND_GLASS

Colour = tuple[int, int, int]

# Lung window (centre -600, width 1500 HU), the window the models see.
WINDOW_LOW_HU = -1350.0
WINDOW_WIDTH_HU = 1500.0
# Overlay colours (RGB) and opacity per lesion class: ground-glass amber, consolidation red.
OVERLAY: dict[int, tuple[Colour, float]] = {
    SEG_GROUND_GLASS: ((255, 190, 0), 0.45),
    SEG_CONSOLIDATION: ((235, 40, 40), 0.55),
}
# Lung outline (from the gateway's lung segmentation), drawn over the lesion colours.
LUNG_OUTLINE: Colour = (60, 200, 255)
# Class activation map: a magenta tint whose opacity follows the map (0 none, 255 strongest).
CAM_COLOUR: Colour = (255, 0, 220)
CAM_MAX_ALPHA = 0.6
LEGEND: tuple[tuple[str, Colour], ...] = (
    ("ground-glass", OVERLAY[SEG_GROUND_GLASS][0]),
    ("consolidation", OVERLAY[SEG_CONSOLIDATION][0]),
    ("lung", LUNG_OUTLINE),
)
CAM_LEGEND = ("activation map", CAM_COLOUR)
MONTAGE_TILES = 12
MONTAGE_COLUMNS = 4
MAX_TILE_PIXELS = 256
TILE_GAP = 4
BACKGROUND: Colour = (32, 32, 32)
LEGEND_TEXT: Colour = (230, 230, 230)
# The caption asks for review in amber and says "not flagged" in grey.
CAPTION_REVIEW: Colour = (255, 190, 0)
CAPTION_PLAIN: Colour = (200, 200, 200)
FONT_SIZE = 14
TEXT_PAD = 6


@dataclass(frozen=True)
class Overlay:
    """A drawn montage: the PNG file's bytes and the slice indices it shows (ascending)."""

    png: bytes
    slices: tuple[int, ...]


def render_overlay(
    volume_hu: np.ndarray,
    label_map: np.ndarray,
    *,
    tiles: int = MONTAGE_TILES,
    columns: int = MONTAGE_COLUMNS,
    lung_map: np.ndarray | None = None,
    cam: np.ndarray | Callable[[list[int]], np.ndarray] | None = None,
    legend: bool = True,
    caption: str | None = None,
) -> Overlay:
    """A montage of up to `tiles` slices, lung window with lesions coloured, as PNG.

    Slices are those with the most lesion (kept apart so neighbours do not fill the montage),
    topped up with evenly spread slices. With `lung_map` (same shape, >0 inside a lung) the
    lungs are outlined; with `cam` (uint8 [Z, Y, X], or a callable giving those slices for
    a list of indices) the class activation map tints the slices under the lesion colours;
    `legend` adds a strip below naming each colour; `caption` (the review line, e.g.
    "REVIEW - LOW CONFIDENCE") a line of text under it.
    """
    volume_hu = np.asarray(volume_hu)
    label_map = np.asarray(label_map)
    if volume_hu.ndim != 3 or volume_hu.shape != label_map.shape:
        raise ValueError(
            f"volume {volume_hu.shape} and label map {label_map.shape} must be the same [Z,Y,X]"
        )
    if lung_map is not None and np.shape(lung_map) != label_map.shape:
        raise ValueError(f"lung map {np.shape(lung_map)} must match the label map")
    # Slice by slice: count_nonzero over axes makes a boolean copy of the whole map.
    lesion_pixels = np.array([np.count_nonzero(plane) for plane in label_map], dtype=np.intp)
    chosen = choose_slices(lesion_pixels, tiles)
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
    image = Image.fromarray(_montage(rendered, columns), mode="RGB")
    if legend:
        entries = list(LEGEND if lung_map is not None else LEGEND[:2])
        if heat is not None:
            entries.append(CAM_LEGEND)
        image = _with_legend(image, entries)
    if caption:
        image = _with_caption(image, caption)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Overlay(buffer.getvalue(), tuple(chosen))


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


def text_strip_height() -> int:
    """Height in pixels of one legend or caption strip below the montage."""
    ascent, descent = _font().getmetrics()
    return ascent + descent + 2 * TEXT_PAD


def _render_tile(
    hu: np.ndarray,
    labels: np.ndarray,
    factor: int,
    lungs: np.ndarray | None = None,
    heat: np.ndarray | None = None,
) -> np.ndarray:
    """One slice as RGB uint8, reduced by `factor` (grey by block mean, labels by block max)."""
    # Whole-HU volumes are int16 (gateway/series.py): the mean in float32 either way.
    hu = hu.astype(np.float32, copy=False)
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


def _montage(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    canvas = np.empty(
        (rows * height + (rows - 1) * TILE_GAP, columns * width + (columns - 1) * TILE_GAP, 3),
        dtype=np.uint8,
    )
    canvas[:] = BACKGROUND
    for i, tile in enumerate(tiles):
        top = (i // columns) * (height + TILE_GAP)
        left = (i % columns) * (width + TILE_GAP)
        canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    return canvas


@functools.cache
def _font() -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=FONT_SIZE)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; the overlay's text needs it")
    return font


def _below(image: Image.Image, width: int) -> tuple[Image.Image, int]:
    """`image` on a canvas one text strip taller (and at least `width` wide); the strip's top."""
    canvas = Image.new(
        "RGB", (max(image.width, width), image.height + text_strip_height()), BACKGROUND
    )
    canvas.paste(image, (0, 0))
    return canvas, image.height


def _with_legend(image: Image.Image, entries: list[tuple[str, Colour]]) -> Image.Image:
    """The montage with a strip below it: a colour swatch and a name per entry."""
    font = _font()
    ascent, descent = font.getmetrics()
    swatch = ascent + descent
    widths = [swatch + TEXT_PAD + math.ceil(font.getlength(name)) for name, _ in entries]
    total = sum(widths) + 2 * TEXT_PAD * len(entries)
    canvas, top = _below(image, total)
    draw = ImageDraw.Draw(canvas)
    left = TEXT_PAD
    for (name, colour), width in zip(entries, widths, strict=True):
        draw.rectangle(
            (left, top + TEXT_PAD, left + swatch - 1, top + TEXT_PAD + swatch - 1), fill=colour
        )
        draw.text((left + swatch + TEXT_PAD, top + TEXT_PAD), name, font=font, fill=LEGEND_TEXT)
        left += width + 2 * TEXT_PAD
    return canvas


def _with_caption(image: Image.Image, caption: str) -> Image.Image:
    """The image with a line of text below it: amber when it asks for review, grey otherwise."""
    font = _font()
    colour = CAPTION_REVIEW if caption.startswith("REVIEW") else CAPTION_PLAIN
    canvas, top = _below(image, math.ceil(font.getlength(caption)) + 2 * TEXT_PAD)
    ImageDraw.Draw(canvas).text((TEXT_PAD, top + TEXT_PAD), caption, font=font, fill=colour)
    return canvas


def add_caption(png: bytes, caption: str) -> bytes:
    """An overlay's PNG with one more caption line below it (the follow-up comparison, which
    the gateway learns after the overlay was drawn)."""
    with Image.open(io.BytesIO(png)) as image:
        canvas = _with_caption(image.convert("RGB"), caption)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = [
    "CAM_COLOUR",
    "LEGEND",
    "LUNG_OUTLINE",
    "Overlay",
    "add_caption",
    "choose_slices",
    "render_overlay",
    "text_strip_height",
]
