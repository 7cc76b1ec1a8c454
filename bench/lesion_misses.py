"""Where the bundled networks lose lesion Dice: the truth's lesion voxels by where they lie.

    .venv/bin/python bench/lesion_misses.py SET [SET ...] [--model-dir DIR]
                                            [--doc docs/models.md]

Every abnormal case of each phantom set (`ctjoint phantom-set` layout: the truth's lung map
`truth/lungs.nii.gz` beside the lesion map) is analysed in-process, as `ctjoint evaluate`
does, and each lesion cross-section of the truth (connected on its slice) is put in one
place by what it touches (the truth's lungs, lesions included, within `NEAR_MM` in-plane):

- `heart/mediastinum`: tissue outside the lungs and between them on its image row (heart,
  mediastinum, great vessels, a diaphragm dome cut across): a consolidation there has the
  heart's density, so its edge against the heart is invisible;
- `chest wall`: tissue outside the lungs elsewhere (ribs, chest wall, the diaphragm under a
  lung), and not the heart;
- `lung`: neither (surrounded by lung).

Printed per set and network: the mean lesion Dice and predicted / true lesion volume of the
abnormal cases, each place's share of the truth's voxels, the share of them the network
found (recall) and their share of all the truth voxels it missed; and the recall at the
lesions' edge (truth voxels with a lesion-free in-plane neighbour) and inside them. With
`--doc` the table is written between the marker lines of the topic file. A benchmark, not a
test: the figures depend on the weights and the phantoms, not the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np
from doc_section import publish  # bench/doc_section.py
from scipy import ndimage

from ctjoint.contracts import CLASS_NAMES, CLASS_NORMAL, MODEL_DEEPSC3D, MODEL_JCS2D
from ctjoint.export.dataset import CaseRef, discover_cases, load_case, read_nifti_labels
from ctjoint.export.metrics import dice_score
from ctjoint.gateway.analysis import ScanAnalyzer
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.review import between_lungs

MODELS = (MODEL_JCS2D, MODEL_DEEPSC3D)
PLACES = ("lung", "heart/mediastinum", "chest wall")
# How near (in-plane) a lesion voxel must lie to tissue outside the lungs to count as against it.
NEAR_MM = 2.0
DOC_BEGIN = "<!-- bench/lesion_misses.py begin -->"
DOC_END = "<!-- bench/lesion_misses.py end -->"


# In-plane 4-neighbourhood of a [Z, Y, X] array: slices are not neighbours.
IN_PLANE = np.zeros((1, 3, 3), dtype=bool)
IN_PLANE[0, 1, :] = IN_PLANE[0, :, 1] = True


def between_mask(lungs: np.ndarray) -> np.ndarray:
    """Voxels outside the lungs and between them on their image row (lungs: 0 outside,
    1 right, 2 left), by the review's rule (gateway/review.py `between_lungs`)."""
    out = np.zeros(lungs.shape, dtype=bool)
    for k in range(lungs.shape[0]):  # a slice at a time: a 512 x 512 x 500 scan's outside
        y, x = np.nonzero(lungs[k] == 0)  # voxels at once would be gigabytes of indices
        out[k, y, x] = between_lungs(lungs[k : k + 1], np.zeros_like(y), y, x)
    return out


def places(lesions: np.ndarray, lungs: np.ndarray, pixel_mm: float) -> np.ndarray:
    """[Z, Y, X] uint8: the index into PLACES of each truth lesion voxel, by what its
    lesion cross-section (connected on its slice) touches (the heart first), and 255 elsewhere."""
    steps = max(1, round(NEAR_MM / pixel_mm))
    between = between_mask(lungs)
    outside = (lungs == 0) & ~between
    by_heart = ndimage.binary_dilation(between, IN_PLANE, iterations=steps)
    by_wall = ndimage.binary_dilation(outside, IN_PLANE, iterations=steps)
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = IN_PLANE[0]  # a lesion's cross-section on each slice is judged on its own
    components, count = ndimage.label(lesions > 0, plane)
    place = np.zeros(count + 1, dtype=np.uint8)
    place[np.unique(components[by_wall])] = 2
    place[np.unique(components[by_heart])] = 1
    place[0] = 255
    return place[components]


def edges(lesions: np.ndarray) -> np.ndarray:
    """Truth lesion voxels with a lesion-free in-plane neighbour."""
    inside = lesions > 0
    return inside & ~ndimage.binary_erosion(inside, IN_PLANE)


def _abnormal(data: Path) -> list[CaseRef]:
    return [r for r in discover_cases(data) if r.label != CLASS_NORMAL]


async def _cases(refs: list[CaseRef], model: str, model_dir: Path | None) -> list[np.ndarray]:
    """Per case: [Dice, predicted voxels, truth voxels, edge truth, found, inside truth,
    found, then per place truth, found]."""
    rows = []
    backend = EmbeddedBackend((model,), model_dir=model_dir, intra_op_threads=2)
    async with backend:
        analyzer = ScanAnalyzer(backend)
        for ref in refs:
            if ref.mask is None:
                raise SystemExit(f"{ref.case_id}: an abnormal case without a lesion map")
            loaded = load_case(ref)
            lungs = read_nifti_labels(ref.mask.parent / "lungs.nii.gz", reorient=False)
            analysis = await analyzer.analyze_volume(loaded.volume, model)
            truth = loaded.lesions > 0
            found = analysis.label_map > 0
            where = places(loaded.lesions, lungs, float(loaded.volume.spacing_mm[1]))[truth]
            edge = edges(loaded.lesions)[truth]
            hit = found[truth]
            row = [dice_score(found, truth), float(found.sum()), float(truth.sum())]
            row += [float(edge.sum()), float(hit[edge].sum()), float((~edge).sum())]
            row += [float(hit[~edge].sum())]
            for place in range(len(PLACES)):
                row += [float(np.sum(where == place)), float(np.sum(hit[where == place]))]
            rows.append(np.array(row))
            recall = " ".join(
                f"{PLACES[p]} {row[8 + 2 * p] / max(row[7 + 2 * p], 1):.2f}"
                for p in range(len(PLACES))
            )
            print(
                f"  {model} {ref.case_id} {CLASS_NAMES[ref.label]}: Dice {row[0]:.3f}"
                f" volume ratio {row[1] / row[2]:.2f}; recall {recall}",
                flush=True,
            )
    return rows


def _line(name: str, model: str, rows: list[np.ndarray]) -> str:
    table = np.array(rows)
    truth = table[:, 7::2].sum(axis=0)
    found = table[:, 8::2].sum(axis=0)
    depth = table[:, 3:7].sum(axis=0)  # edge truth, found, inside truth, found
    missed = truth - found
    cells = [
        f"{np.mean(table[:, 0]):.3f}",
        f"{np.mean(table[:, 1] / table[:, 2]):.2f}",
        " / ".join(f"{t / truth.sum():.2f}" for t in truth),
        " / ".join(f"{f / max(t, 1):.2f}" for f, t in zip(found, truth, strict=True)),
        " / ".join(f"{m / max(missed.sum(), 1):.2f}" for m in missed),
        f"{depth[1] / max(depth[0], 1):.2f} / {depth[3] / max(depth[2], 1):.2f}",
    ]
    return f"| {name} | {model} | {len(rows)} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sets", type=Path, nargs="+", help="phantom-set folders")
    parser.add_argument("--model-dir", type=Path, help="folder with jcs2d.onnx and deepsc3d.onnx")
    parser.add_argument("--doc", type=Path)
    args = parser.parse_args(argv)

    order = " / ".join(PLACES)
    lines = [
        f"Abnormal cases of each set through the in-process pipeline on the source grid; places"
        f" in the order {order} (what each truth lesion cross-section touches within {NEAR_MM:g} mm"
        " in-plane: tissue between the lungs, other tissue outside them, neither).",
        "",
        "| set | model | abnormal cases | mean lesion Dice | mean predicted / true volume"
        " | share of the truth | recall | share of the missed voxels"
        " | recall at the edge / inside |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in args.sets:
        refs = _abnormal(path)
        if not refs:
            print(f"{path}: no abnormal cases", file=sys.stderr)
            return 2
        for model in MODELS:
            rows = asyncio.run(_cases(refs, model, args.model_dir))
            lines.append(_line(path.name, model, rows))
    return publish("\n".join(lines), args.doc, DOC_BEGIN, DOC_END)


if __name__ == "__main__":
    sys.exit(main())
