"""A gateway's answer back into plain Python: the result dict and the label map.

`result_dict` uses the one result encoder (ctjoint/result_json.py) that `ctjoint analyze
--json` uses too, so scripts read one format whichever way a scan was analysed. Imports only
numpy, the generated proto code and neutral modules: this runs on the scanner side.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from ctjoint.client.errors import ResultFormatError
from ctjoint.result_json import MalformedResultError
from ctjoint.result_json import result_dict as encode_result
from ctjoint.v1 import scan_pb2


def result_dict(message: scan_pb2.ScanResult) -> dict[str, Any]:
    """The JSON-ready dict of a gateway's answer (ctjoint/result_json.py, the one encoder);
    ResultFormatError when the message does not decode."""
    try:
        return encode_result(message)
    except MalformedResultError as err:
        raise ResultFormatError(str(err)) from err


def decode_label_map(volume: scan_pb2.LabelVolume) -> np.ndarray:
    """The uint8 [slices, rows, columns] label map of a LabelVolume."""
    if volume.encoding != scan_pb2.LabelVolume.ENCODING_ZLIB_UINT8:
        raise ResultFormatError(f"unknown mask encoding {volume.encoding}")
    shape = tuple(int(v) for v in volume.shape)
    if len(shape) != 3:
        raise ResultFormatError(f"a mask has three dimensions, got shape {list(shape)}")
    try:
        raw = zlib.decompress(volume.data)
    except zlib.error as err:
        raise ResultFormatError(f"the mask does not decompress ({err})") from err
    if len(raw) != int(np.prod(shape)):
        raise ResultFormatError(f"the mask holds {len(raw)} bytes, shape {list(shape)} needs more")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
