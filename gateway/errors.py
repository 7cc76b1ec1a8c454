"""The gateway's exception hierarchy: one root, one subclass per cause.

Messages name the file and the attribute at fault and never carry patient identifiers.
Foreign errors (pydicom, onnxruntime, tritonclient) are translated at the boundary with
`raise ... from err`; the gRPC layer (issue: gateway) maps these classes to status codes in one
place.
"""

from __future__ import annotations

# The project's root (ctjoint/errors.py); the gateway's causes below derive from it.
from ctjoint.errors import CtJointError


class InputError(CtJointError):
    """The caller sent something we cannot analyse (maps to INVALID_ARGUMENT)."""

    def __init__(self, problem: str, *, source: str | None = None, attribute: str | None = None):
        self.problem = problem
        self.source = source
        self.attribute = attribute
        parts = []
        if source is not None:
            parts.append(source)
        if attribute is not None:
            parts.append(attribute)
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {problem}" if prefix else problem)


class EmptySeriesError(InputError):
    """No DICOM file at all."""


class NotDicomError(InputError):
    """A file is not a DICOM Part-10 file (or is truncated beyond reading)."""


class NotCtError(InputError):
    """A DICOM file that is not a CT image (wrong modality or SOP class)."""


class UnsupportedSopClassError(NotCtError):
    """A CT object we do not read (Enhanced / Legacy Converted Enhanced CT, multi-frame)."""


class MissingAttributeError(InputError):
    """A required attribute is absent or empty."""


class InvalidAttributeError(InputError):
    """An attribute is present but its value is unusable."""


class MixedSeriesError(InputError):
    """Files from more than one series (or study) in one scan."""


class InconsistentGeometryError(InputError):
    """Slices disagree on orientation, size or spacing, or positions collide."""


class DuplicateSliceError(InconsistentGeometryError):
    """Two files are the same instance or sit at the same position along the slice normal."""


class UnsupportedTransferSyntaxError(CtJointError):
    """Pixel data we cannot decode here (maps to FAILED_PRECONDITION)."""

    def __init__(self, problem: str, *, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {problem}" if source else problem)


class LimitExceededError(CtJointError):
    """Too big, too many slices, too many concurrent scans (maps to RESOURCE_EXHAUSTED)."""


class AdmissionRefusedError(LimitExceededError):
    """Every scan slot is taken: refused before a byte is read (RESOURCE_EXHAUSTED; retry)."""


class ModelNotFoundError(CtJointError):
    """The requested model is not known or its artefact is missing (maps to NOT_FOUND)."""


class BackendUnavailableError(CtJointError):
    """The inference backend cannot serve right now (maps to UNAVAILABLE)."""


class BackendError(CtJointError):
    """The inference backend failed on a request (maps to INTERNAL)."""


class DeadlineExceededError(CtJointError, TimeoutError):
    """The caller's deadline passed before the backend answered (maps to DEADLINE_EXCEEDED)."""


class AnalysisLimitError(LimitExceededError):
    """A scan's analysis ran past its CPU-time or wall-time bound and was ended
    (RESOURCE_EXHAUSTED)."""


class AnalysisMemoryError(AnalysisLimitError):
    """A scan's analysis needed more memory than its bound (RESOURCE_EXHAUSTED): the scan
    ends, its worker goes on."""


class AnalysisCrashedError(BackendError):
    """The process analysing a scan died under it (a crash, or killed for memory): that scan
    fails (INTERNAL), the process is replaced, the gateway goes on."""
