"""A label map on a DICOM series' grid -> one DICOM SEG file, without dcmqi.

THE one place where ensam writes DICOM SEG: a saved ``final`` label (``main.DICOMwebDatastoreWithPydicomSeg``), an
inference result asked for as ``output=dicom_seg`` (``lib.http.routes.infer_as_dicom_seg``) and a batch job's result
for a DICOMweb study (``lib.batch.worker``) all come here (below all three). The writer is monailabel's own
``nifti_to_dicom_seg(..., use_itk=False)`` (pydicom-seg's ``MultiClassWriter``: one segment per label value, frames
on the source slices, references to the source instances); dcmqi's ``itkimage2segimage``, which monailabel uses
otherwise, cannot be downloaded on an offline server.

What this module adds to monailabel's writer:

* segment names follow the label VALUES: monailabel names the n-th value present in the image after the n-th
  ``label_info`` entry, so a label holding only value 2 of ``[{"name": "liver", "idx": 1}, {"name": "spleen",
  "idx": 2}]`` was written as "liver". Here each present value gets the entry whose ``idx`` it is (or the name a
  result's ``label_names`` gives it, or ``segment <value>``);
* a coded segment type that is true for every name ("Anatomical structure", SCT 91723000) instead of monailabel's
  fixed SCT 78961009 (that is the code of the spleen) with the segment's name as its meaning;
* the series description names the source (``ensam`` by default, monailabel wrote ``AIName``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

CATEGORY = {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"}
TYPE = {"CodeValue": "91723000", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical structure"}


def label_values(label_file: str) -> List[int]:
    """The non-zero values present in a label image (ascending), as the SEG writer will see them."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(sitk.ReadImage(label_file))  # a copy: a view would outlive its image
    return [int(v) for v in np.unique(arr) if v != 0]


def segments_for(values: Sequence[int], label_info: Optional[Sequence[Mapping[str, Any]]] = None,
                 label_names: Optional[Mapping[str, int]] = None, series_description: str = "ensam"
                 ) -> List[Dict[str, Any]]:
    """One ``label_info`` entry per present value, in the writer's order (ascending values).

    ``label_info``: monailabel's request form, ``[{"name": ..., "idx": value, "color": [r, g, b],
    "description": ...}]`` (3D Slicer sends it when it saves); ``label_names``: a result's ``{name: value}``."""
    by_value: Dict[int, Dict[str, Any]] = {}
    for name, value in (label_names or {}).items():
        by_value.setdefault(int(value), {"name": str(name)})
    for entry in label_info or []:
        if isinstance(entry, Mapping) and "idx" in entry:
            by_value[int(entry["idx"])] = dict(entry)
    out = []
    for value in values:
        info = dict(by_value.get(int(value)) or {"name": f"segment {value}"})
        name = str(info.get("name") or f"segment {value}")
        info.update({"name": name, "idx": int(value)})
        attr = {
            "labelID": int(value),
            "SegmentLabel": name,
            "SegmentDescription": str(info.get("description") or name),
            "SegmentAlgorithmType": "AUTOMATIC",
            "SegmentAlgorithmName": series_description,
            "SegmentedPropertyCategoryCodeSequence": dict(CATEGORY),
            "SegmentedPropertyTypeCodeSequence": dict(TYPE),
        }
        if info.get("color") is not None:
            attr["recommendedDisplayRGBValue"] = [int(c) for c in list(info["color"])[:3]]
        else:
            from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS

            attr["recommendedDisplayRGBValue"] = [int(c) for c in GENERIC_ANATOMY_COLORS.get(name, (255, 0, 0))]
        info["segmentAttribute"] = info.get("segmentAttribute") or attr
        out.append(info)
    if out:
        out[0].setdefault("model_name", series_description)
    return out


def write_dicom_seg(series_dir: str, label_file: str, label_info: Optional[Sequence[Mapping[str, Any]]] = None,
                    label_names: Optional[Mapping[str, int]] = None, series_description: str = "ensam") -> str:
    """Write ``label_file`` (any image SimpleITK reads, on the grid of the DICOM series in ``series_dir``) as a DICOM
    SEG; returns the path of a temporary ``.dcm`` file (the caller removes it), or "" when the label is empty."""
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    values = label_values(label_file)
    if not values:
        return ""
    segments = segments_for(values, label_info, label_names, series_description)
    logger.info(f"DICOM SEG: {[(s['idx'], s['name']) for s in segments]} on {series_dir}")
    return nifti_to_dicom_seg(series_dir, label_file, segments, use_itk=False)
