"""File intake: each DICOM file of a scan read, validated and taken into its series as it arrives.

What can be done per file is done here, while the rest of the series is still on its way: the
in-plane half of preprocessing (with a model's plan) and the per-slice half of the lung
segmentation. The gateway feeds files from a stream, `ctjoint analyze` from a folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from ctjoint.gateway.dicom_io import (
    DicomSource,
    ct_slice_from_dataset,
    describe_source,
    is_localizer,
    read_dataset,
)
from ctjoint.gateway.errors import EmptySeriesError, InputError
from ctjoint.gateway.lesions import LungSlices
from ctjoint.gateway.limits import cpu_bound
from ctjoint.gateway.preprocess import PreprocessPlan, inplane_slices, slice_label_maps
from ctjoint.gateway.series import CtVolume, SeriesAssembler, StudySorter
from ctjoint.series_rules import Selection

# A file to analyse: (name used in errors, e.g. "IM00003.dcm" or "", path or bytes).
DicomInput = tuple[str, DicomSource]


@dataclass(frozen=True)
class Progress:
    """A progress event; `stage`: "validated" (per file), "preprocessed", "inferred" (per
    batch, `done` counts slices), "postprocessed"."""

    stage: str
    done: int
    total: int | None


ProgressCallback = Callable[[Progress], None]
# Told of each slice taken into a series: (arrival slot, distance along the slice normal).
SliceCallback = Callable[[int, float], None]


class SeriesIntake:
    """Validates and assembles files one by one as they arrive, timing the work (not the wait).

    The gateway feeds it the files of a stream; `analyze_files` feeds it a folder. Files are
    named in errors by arrival order and name: "file 3 (IM00003.dcm)". Given a model's `plan`,
    each slice is also preprocessed in-plane as it arrives (`planes`, by arrival slot), and
    `on_slice` hears of it: that is what streaming inference starts from.
    """

    def __init__(
        self,
        *,
        expected_slices: int | None = None,
        max_slices: int | None = None,
        progress: ProgressCallback | None = None,
        skip_localizers: bool = True,
        plan: PreprocessPlan | None = None,
        on_slice: SliceCallback | None = None,
        file_numbers: Sequence[int] | None = None,
    ) -> None:
        self._assembler = SeriesAssembler(expected_slices=expected_slices, max_slices=max_slices)
        # Files of other series of the study, set aside for the series choice.
        self.study = StudySorter(max_files=max_slices)
        self.selection: Selection | None = None
        # Each file's number in the scan's stream (a replayed series keeps its own).
        self._numbers = None if file_numbers is None else list(file_numbers)
        self._skip_localizers = skip_localizers
        self.skipped_localizers = 0
        self._expected = expected_slices
        self._progress = progress
        self._plan = plan
        self.on_slice = on_slice
        self._count = 0
        self.read_ms = 0.0
        self.validate_ms = 0.0
        self.preprocess_ms = 0.0
        # The lungs' per-slice work: postprocessing done early, counted as postprocessing.
        self.lungs_ms = 0.0
        # (rows, columns) of the series' slices, once the first has arrived.
        self.slice_shape: tuple[int, int] | None = None
        self.header: Dataset | None = None
        # In-plane preprocessed slices [H, W] by arrival slot (only with a plan). With a known
        # count they are rows of one buffer with `plan.context` spare rows at each end, so a
        # series that arrives in order (either way) is already the model's stacked slices.
        self.planes: list[np.ndarray] = []
        self._plane_rows: np.ndarray | None = None
        # The per-slice half of the lung segmentation, by arrival slot (only with a plan).
        # With the count known, each slice's lungs are written into the lung map as it arrives.
        self.lung_slices: LungSlices | None = (
            None if plan is None else LungSlices(capacity=expected_slices)
        )

    @property
    def count(self) -> int:
        return self._count

    async def add(self, data: DicomSource, name: str = "") -> None:
        """Read, validate and take one file; raises the project's InputError subclasses."""
        index = self._count + 1
        number = self._numbers[self._count] if self._numbers is not None else index
        source = describe_source(number, name or None)
        taken = await cpu_bound(self._add, data, source, number, name)
        self._count = index
        if self._progress is not None:
            self._progress(Progress("validated", index, self._expected))
        if taken is not None and self.on_slice is not None:
            self.on_slice(*taken)

    def _add(
        self, data: DicomSource, source: str, number: int = 0, name: str = ""
    ) -> tuple[int, float] | None:
        """Returns the slice's (slot, distance along the normal), None for a skipped file."""
        # Per-file work (parse, CT checks, decode to HU) is "read"; the series-level checks and
        # the copy into the volume are "validate", matching StageTimings.
        started = time.perf_counter()
        dataset = read_dataset(data, source=source)
        if self.study.set_aside(dataset, data, number, name):
            # Another series of the study: kept for the series choice (gateway/series.py).
            self.read_ms += (time.perf_counter() - started) * 1000.0
            return None
        if self._skip_localizers and is_localizer(dataset):
            # Series selection rule: scouts travel with the study but are not part of the
            # volume (dicom_io.is_localizer documents the rule).
            self.skipped_localizers += 1
            self.read_ms += (time.perf_counter() - started) * 1000.0
            return None
        ct_slice = ct_slice_from_dataset(dataset, source=source, hu_out=self._assembler.next_slot)
        if self.slice_shape is None:
            self.slice_shape = (int(ct_slice.hu.shape[0]), int(ct_slice.hu.shape[1]))
        if self.header is None:
            # One file's header (without its pixels) serves the DICOM outputs.
            header = dataset.copy()
            if "PixelData" in header:
                del header.PixelData
            self.header = header
        parsed = time.perf_counter()
        slot = self._assembler.add(ct_slice)
        validated = time.perf_counter()
        self.read_ms += (parsed - started) * 1000.0
        self.validate_ms += (validated - parsed) * 1000.0
        preprocessed = validated
        if self._plan is not None:
            self.planes.append(self._keep_plane(slot, inplane_slices(ct_slice.hu, self._plan)))
            preprocessed = time.perf_counter()
            self.preprocess_ms += (preprocessed - validated) * 1000.0
        normal = self._assembler.normal
        distance = float(np.dot(ct_slice.position, normal)) if normal is not None else 0.0
        if self.lung_slices is not None:
            self.lung_slices.add(slot, ct_slice.hu, distance, ct_slice.orientation)
            self.lungs_ms += (time.perf_counter() - preprocessed) * 1000.0
        return slot, distance

    def label_slices(self, seg_logits: np.ndarray) -> list[np.ndarray | None]:
        """Label maps on this series' grid of a streamed batch (`slice_label_maps`)."""
        if self.slice_shape is None:
            raise RuntimeError("no slice has arrived yet, so the source grid is unknown")
        return slice_label_maps(seg_logits, *self.slice_shape)

    @property
    def sorted_slots(self) -> tuple[int, ...]:
        """Arrival slots in the finished volume's order (empty before `finish`)."""
        return self._assembler.sorted_slots

    def _keep_plane(self, slot: int, plane: np.ndarray) -> np.ndarray:
        """`plane` as row `slot` of the planes' buffer (made at the first slice when the count
        is known); `plane` itself when there is no room for it there."""
        if self._plan is None or not self._expected:
            return plane
        pad = self._plan.context
        if self._plane_rows is None and slot == 0:
            self._plane_rows = np.empty((self._expected + 2 * pad, *plane.shape), np.float32)
        rows = self._plane_rows
        if rows is None or slot >= self._expected or rows.shape[1:] != plane.shape:
            return plane
        rows[pad + slot] = plane
        return rows[pad + slot]

    def sorted_planes(self, pad: int = 0) -> np.ndarray | None:
        """The in-plane preprocessed slices [Z, H, W] in the finished volume's order, with the
        first and last repeated `pad` times at each end; None without a plan. A view of the
        planes' buffer when the series came in order (either way), else a copy."""
        if self._plan is None or not self.planes:
            return None
        slots = self.sorted_slots
        n, rows, spare = len(slots), self._plane_rows, self._plan.context
        if rows is not None and n == self._expected and pad <= spare:
            base = None
            if slots == tuple(range(n)):
                base = rows
            elif slots == tuple(range(n - 1, -1, -1)):
                base = rows[::-1]
            if base is not None:
                # The spare rows repeat the edge slices (either way round, by symmetry).
                rows[:spare] = rows[spare]
                rows[spare + n :] = rows[spare + n - 1]
                return base[spare - pad : spare + n + pad]
        order = [slots[0]] * pad + list(slots) + [slots[-1]] * pad
        return np.stack([self.planes[slot] for slot in order])

    def release_planes(self) -> None:
        """Drop the in-plane slices once the model's input is made from them (25 MB at
        512x512x400 for a 128x128 model), so postprocessing runs without them."""
        self.planes.clear()
        self._plane_rows = None

    async def finish(self) -> CtVolume:
        """Sort, check spacing and return the volume (EmptySeriesError if nothing arrived)."""
        started = time.perf_counter()
        # Raises SeriesSwitch when the rules choose a series that was set aside.
        self.selection = self.study.select()
        if self.skipped_localizers and not len(self._assembler):
            raise EmptySeriesError(
                f"no CT slice was received, only {self.skipped_localizers} localizer image(s)"
            )
        try:
            volume = await cpu_bound(self._assembler.finish)
        except InputError as err:
            named = self.study.naming_set_aside(err)
            if named is err:
                raise
            raise named from err
        self.validate_ms += (time.perf_counter() - started) * 1000.0
        return volume


__all__ = ["DicomInput", "Progress", "ProgressCallback", "SeriesIntake", "SliceCallback"]
