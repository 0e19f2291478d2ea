"""The one reader of an ``output=all`` answer of ``POST /infer/{model}``: a multipart body of a JSON ``params`` part
and the result's ``image`` part (NIfTI, NRRD, DICOM SEG). Used by the HTTP clients of this project (benchmark,
labelling-loop simulator, tests) and by the server's DICOM SEG route."""

from __future__ import annotations

import json
from typing import Optional, Tuple

__all__ = ["split_answer", "result_suffix", "read_answer"]


def split_answer(body: bytes, content_type: str) -> Tuple[dict, Optional[bytes]]:
    """(params, image bytes or None) of a multipart ``output=all`` answer."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    params, data = {}, None
    for part in MultipartDecoder(body, content_type).parts:
        disp = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disp:
            params = json.loads(part.content)
        elif 'name="image"' in disp:
            data = part.content
    return params, data


def result_suffix(data: bytes) -> str:
    """The file suffix of a result's bytes: ``.nii.gz`` for gzip, else ``.nrrd``."""
    return ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nrrd"


def read_answer(body: bytes, content_type: str):
    """(the result as a :class:`lib.io.volumes.Volume`, params) of an ``output=all`` answer of a NIfTI or NRRD
    result; ValueError when the answer has no image."""
    import os
    import tempfile

    from .volumes import load_volume

    params, data = split_answer(body, content_type)
    if data is None:
        raise ValueError("no image part in the answer")
    fd, path = tempfile.mkstemp(suffix=result_suffix(data), prefix="ensam_answer_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_volume(path), params
    finally:
        os.remove(path)
