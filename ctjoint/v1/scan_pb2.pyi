from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScanRequest(_message.Message):
    __slots__ = ("header", "file")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    header: ScanHeader
    file: DicomFile
    def __init__(self, header: _Optional[_Union[ScanHeader, _Mapping]] = ..., file: _Optional[_Union[DicomFile, _Mapping]] = ...) -> None: ...

class ScanHeader(_message.Message):
    __slots__ = ("request_id", "model", "outputs", "expected_files")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FILES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    outputs: OutputOptions
    expected_files: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., outputs: _Optional[_Union[OutputOptions, _Mapping]] = ..., expected_files: _Optional[int] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("masks", "seg", "overlay", "sr", "cam")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    SEG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    SR_FIELD_NUMBER: _ClassVar[int]
    CAM_FIELD_NUMBER: _ClassVar[int]
    masks: bool
    seg: bool
    overlay: bool
    sr: bool
    cam: bool
    def __init__(self, masks: _Optional[bool] = ..., seg: _Optional[bool] = ..., overlay: _Optional[bool] = ..., sr: _Optional[bool] = ..., cam: _Optional[bool] = ...) -> None: ...

class DicomFile(_message.Message):
    __slots__ = ("content",)
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    def __init__(self, content: _Optional[bytes] = ...) -> None: ...

class ScanResult(_message.Message):
    __slots__ = ("request_id", "label", "class_names", "probabilities", "slices", "lesions", "mask", "seg_dicom", "overlay_png", "timings", "model", "backend", "geometry", "slice_file_number", "quantification", "sr_dicom", "pacs", "cam", "review", "members", "series_selection", "comparison")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    LESIONS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    SEG_DICOM_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    SLICE_FILE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    QUANTIFICATION_FIELD_NUMBER: _ClassVar[int]
    SR_DICOM_FIELD_NUMBER: _ClassVar[int]
    PACS_FIELD_NUMBER: _ClassVar[int]
    CAM_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SERIES_SELECTION_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    slices: _containers.RepeatedCompositeFieldContainer[SliceEvidence]
    lesions: LesionStatistics
    mask: LabelVolume
    seg_dicom: bytes
    overlay_png: bytes
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    model: ModelRef
    backend: str
    geometry: SeriesGeometry
    slice_file_number: _containers.RepeatedScalarFieldContainer[int]
    quantification: Quantification
    sr_dicom: bytes
    pacs: PacsOutcome
    cam: ScalarVolume
    review: Review
    members: _containers.RepeatedCompositeFieldContainer[ModelAnswer]
    series_selection: SeriesSelection
    comparison: Comparison
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., probabilities: _Optional[_Iterable[float]] = ..., slices: _Optional[_Iterable[_Union[SliceEvidence, _Mapping]]] = ..., lesions: _Optional[_Union[LesionStatistics, _Mapping]] = ..., mask: _Optional[_Union[LabelVolume, _Mapping]] = ..., seg_dicom: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., backend: _Optional[str] = ..., geometry: _Optional[_Union[SeriesGeometry, _Mapping]] = ..., slice_file_number: _Optional[_Iterable[int]] = ..., quantification: _Optional[_Union[Quantification, _Mapping]] = ..., sr_dicom: _Optional[bytes] = ..., pacs: _Optional[_Union[PacsOutcome, _Mapping]] = ..., cam: _Optional[_Union[ScalarVolume, _Mapping]] = ..., review: _Optional[_Union[Review, _Mapping]] = ..., members: _Optional[_Iterable[_Union[ModelAnswer, _Mapping]]] = ..., series_selection: _Optional[_Union[SeriesSelection, _Mapping]] = ..., comparison: _Optional[_Union[Comparison, _Mapping]] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("available", "reason", "category", "prior_study_date", "interval_days", "prior_label", "current_label", "prior_total_ml", "current_total_ml", "changes", "rule")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRIOR_STUDY_DATE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_DAYS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LABEL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LABEL_FIELD_NUMBER: _ClassVar[int]
    PRIOR_TOTAL_ML_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TOTAL_ML_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    available: bool
    reason: str
    category: str
    prior_study_date: str
    interval_days: float
    prior_label: str
    current_label: str
    prior_total_ml: float
    current_total_ml: float
    changes: _containers.RepeatedCompositeFieldContainer[MeasureChange]
    rule: str
    def __init__(self, available: _Optional[bool] = ..., reason: _Optional[str] = ..., category: _Optional[str] = ..., prior_study_date: _Optional[str] = ..., interval_days: _Optional[float] = ..., prior_label: _Optional[str] = ..., current_label: _Optional[str] = ..., prior_total_ml: _Optional[float] = ..., current_total_ml: _Optional[float] = ..., changes: _Optional[_Iterable[_Union[MeasureChange, _Mapping]]] = ..., rule: _Optional[str] = ...) -> None: ...

class MeasureChange(_message.Message):
    __slots__ = ("measure", "absolute", "relative")
    MEASURE_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_FIELD_NUMBER: _ClassVar[int]
    measure: str
    absolute: float
    relative: float
    def __init__(self, measure: _Optional[str] = ..., absolute: _Optional[float] = ..., relative: _Optional[float] = ...) -> None: ...

class SeriesSelection(_message.Message):
    __slots__ = ("analysed", "reason", "skipped", "notes")
    ANALYSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    analysed: SelectedSeries
    reason: str
    skipped: _containers.RepeatedCompositeFieldContainer[SelectedSeries]
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, analysed: _Optional[_Union[SelectedSeries, _Mapping]] = ..., reason: _Optional[str] = ..., skipped: _Optional[_Iterable[_Union[SelectedSeries, _Mapping]]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class SelectedSeries(_message.Message):
    __slots__ = ("series", "number", "images", "slice_thickness_mm", "coverage_mm", "kernel", "reason")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SLICE_THICKNESS_MM_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_MM_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    series: str
    number: int
    images: int
    slice_thickness_mm: float
    coverage_mm: float
    kernel: str
    reason: str
    def __init__(self, series: _Optional[str] = ..., number: _Optional[int] = ..., images: _Optional[int] = ..., slice_thickness_mm: _Optional[float] = ..., coverage_mm: _Optional[float] = ..., kernel: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("needed", "reasons", "details", "signals")
    NEEDED_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    needed: bool
    reasons: _containers.RepeatedScalarFieldContainer[str]
    details: _containers.RepeatedScalarFieldContainer[str]
    signals: _containers.RepeatedCompositeFieldContainer[ReviewSignal]
    def __init__(self, needed: _Optional[bool] = ..., reasons: _Optional[_Iterable[str]] = ..., details: _Optional[_Iterable[str]] = ..., signals: _Optional[_Iterable[_Union[ReviewSignal, _Mapping]]] = ...) -> None: ...

class ReviewSignal(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class ModelAnswer(_message.Message):
    __slots__ = ("model", "label", "probabilities", "lesion_volume_ml", "review")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LESION_VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    label: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    lesion_volume_ml: float
    review: Review
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., lesion_volume_ml: _Optional[float] = ..., review: _Optional[_Union[Review, _Mapping]] = ...) -> None: ...

class ScalarVolume(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Quantification(_message.Message):
    __slots__ = ("lungs", "bilateral", "peripheral_fraction", "central_fraction", "distribution", "severity_score", "method", "peripheral_rule", "severity_scale")
    LUNGS_FIELD_NUMBER: _ClassVar[int]
    BILATERAL_FIELD_NUMBER: _ClassVar[int]
    PERIPHERAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_SCORE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PERIPHERAL_RULE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_SCALE_FIELD_NUMBER: _ClassVar[int]
    lungs: _containers.RepeatedCompositeFieldContainer[LungStatistics]
    bilateral: bool
    peripheral_fraction: float
    central_fraction: float
    distribution: str
    severity_score: int
    method: str
    peripheral_rule: str
    severity_scale: str
    def __init__(self, lungs: _Optional[_Iterable[_Union[LungStatistics, _Mapping]]] = ..., bilateral: _Optional[bool] = ..., peripheral_fraction: _Optional[float] = ..., central_fraction: _Optional[float] = ..., distribution: _Optional[str] = ..., severity_score: _Optional[int] = ..., method: _Optional[str] = ..., peripheral_rule: _Optional[str] = ..., severity_scale: _Optional[str] = ...) -> None: ...

class LungStatistics(_message.Message):
    __slots__ = ("side", "volume_ml", "lesions", "total_lesion_ml", "percent_involved", "zones")
    SIDE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    LESIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LESION_ML_FIELD_NUMBER: _ClassVar[int]
    PERCENT_INVOLVED_FIELD_NUMBER: _ClassVar[int]
    ZONES_FIELD_NUMBER: _ClassVar[int]
    side: str
    volume_ml: float
    lesions: _containers.RepeatedCompositeFieldContainer[LesionClassStatistics]
    total_lesion_ml: float
    percent_involved: float
    zones: _containers.RepeatedCompositeFieldContainer[ZoneStatistics]
    def __init__(self, side: _Optional[str] = ..., volume_ml: _Optional[float] = ..., lesions: _Optional[_Iterable[_Union[LesionClassStatistics, _Mapping]]] = ..., total_lesion_ml: _Optional[float] = ..., percent_involved: _Optional[float] = ..., zones: _Optional[_Iterable[_Union[ZoneStatistics, _Mapping]]] = ...) -> None: ...

class ZoneStatistics(_message.Message):
    __slots__ = ("zone", "lung_volume_ml", "lesion_volume_ml", "percent_involved", "severity")
    ZONE_FIELD_NUMBER: _ClassVar[int]
    LUNG_VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    LESION_VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    PERCENT_INVOLVED_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    zone: str
    lung_volume_ml: float
    lesion_volume_ml: float
    percent_involved: float
    severity: int
    def __init__(self, zone: _Optional[str] = ..., lung_volume_ml: _Optional[float] = ..., lesion_volume_ml: _Optional[float] = ..., percent_involved: _Optional[float] = ..., severity: _Optional[int] = ...) -> None: ...

class PacsOutcome(_message.Message):
    __slots__ = ("destination", "stored", "attempts", "error", "objects", "status")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    destination: str
    stored: bool
    attempts: int
    error: str
    objects: _containers.RepeatedScalarFieldContainer[str]
    status: str
    def __init__(self, destination: _Optional[str] = ..., stored: _Optional[bool] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ..., objects: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ...) -> None: ...

class SliceEvidence(_message.Message):
    __slots__ = ("index", "probabilities", "lesion_pixels")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LESION_PIXELS_FIELD_NUMBER: _ClassVar[int]
    index: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    lesion_pixels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., lesion_pixels: _Optional[_Iterable[int]] = ...) -> None: ...

class LesionStatistics(_message.Message):
    __slots__ = ("classes", "total_voxels", "total_volume_ml", "voxel_volume_ml")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VOXELS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    VOXEL_VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[LesionClassStatistics]
    total_voxels: int
    total_volume_ml: float
    voxel_volume_ml: float
    def __init__(self, classes: _Optional[_Iterable[_Union[LesionClassStatistics, _Mapping]]] = ..., total_voxels: _Optional[int] = ..., total_volume_ml: _Optional[float] = ..., voxel_volume_ml: _Optional[float] = ...) -> None: ...

class LesionClassStatistics(_message.Message):
    __slots__ = ("name", "voxels", "volume_ml")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOXELS_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    name: str
    voxels: int
    volume_ml: float
    def __init__(self, name: _Optional[str] = ..., voxels: _Optional[int] = ..., volume_ml: _Optional[float] = ...) -> None: ...

class LabelVolume(_message.Message):
    __slots__ = ("encoding", "shape", "data", "class_names")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[LabelVolume.Encoding]
        ENCODING_ZLIB_UINT8: _ClassVar[LabelVolume.Encoding]
    ENCODING_UNSPECIFIED: LabelVolume.Encoding
    ENCODING_ZLIB_UINT8: LabelVolume.Encoding
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    encoding: LabelVolume.Encoding
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, encoding: _Optional[_Union[LabelVolume.Encoding, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class SeriesGeometry(_message.Message):
    __slots__ = ("slices", "rows", "columns", "slice_spacing_mm", "row_spacing_mm", "column_spacing_mm", "slice_thickness_mm")
    SLICES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SLICE_SPACING_MM_FIELD_NUMBER: _ClassVar[int]
    ROW_SPACING_MM_FIELD_NUMBER: _ClassVar[int]
    COLUMN_SPACING_MM_FIELD_NUMBER: _ClassVar[int]
    SLICE_THICKNESS_MM_FIELD_NUMBER: _ClassVar[int]
    slices: int
    rows: int
    columns: int
    slice_spacing_mm: float
    row_spacing_mm: float
    column_spacing_mm: float
    slice_thickness_mm: float
    def __init__(self, slices: _Optional[int] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ..., slice_spacing_mm: _Optional[float] = ..., row_spacing_mm: _Optional[float] = ..., column_spacing_mm: _Optional[float] = ..., slice_thickness_mm: _Optional[float] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "milliseconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    milliseconds: float
    def __init__(self, stage: _Optional[str] = ..., milliseconds: _Optional[float] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ScanEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: ScanResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ScanResult, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "done", "total", "request_id")
    class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STAGE_UNSPECIFIED: _ClassVar[Progress.Stage]
        STAGE_RECEIVED: _ClassVar[Progress.Stage]
        STAGE_VALIDATED: _ClassVar[Progress.Stage]
        STAGE_PREPROCESSED: _ClassVar[Progress.Stage]
        STAGE_INFERRED: _ClassVar[Progress.Stage]
        STAGE_POSTPROCESSED: _ClassVar[Progress.Stage]
    STAGE_UNSPECIFIED: Progress.Stage
    STAGE_RECEIVED: Progress.Stage
    STAGE_VALIDATED: Progress.Stage
    STAGE_PREPROCESSED: Progress.Stage
    STAGE_INFERRED: Progress.Stage
    STAGE_POSTPROCESSED: Progress.Stage
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    stage: Progress.Stage
    done: int
    total: int
    request_id: str
    def __init__(self, stage: _Optional[_Union[Progress.Stage, str]] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("backend", "default_model", "models")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    default_model: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, backend: _Optional[str] = ..., default_model: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "class_names", "seg_class_names", "input", "ready", "trained_on")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    SEG_CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    TRAINED_ON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    seg_class_names: _containers.RepeatedScalarFieldContainer[str]
    input: InputGeometry
    ready: bool
    trained_on: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., seg_class_names: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[InputGeometry, _Mapping]] = ..., ready: _Optional[bool] = ..., trained_on: _Optional[str] = ...) -> None: ...

class InputGeometry(_message.Message):
    __slots__ = ("kind", "channels", "depth", "height", "width")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    kind: str
    channels: int
    depth: int
    height: int
    width: int
    def __init__(self, kind: _Optional[str] = ..., channels: _Optional[int] = ..., depth: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...
