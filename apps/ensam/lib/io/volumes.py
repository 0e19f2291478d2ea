"""Reading a 3D volume as stored (no reorientation): THE volume loader, shared by the server (infer, train,
batch), the evaluator and the training data. Plain NumPy + nibabel / SimpleITK: no MONAI Label import.

``lib.io.imageio`` re-exports these names and adds the server's side (upload checks, the volume cache, the
mask writer)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Tuple

import numpy as np

__all__ = ["Volume", "load_volume", "is_nifti", "file_key"]

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image as stored: ``array[i, j, k]``, ``affine`` (RAS), and where it came from."""

    array: np.ndarray
    affine: np.ndarray
    path: str = ""
    header: Any = field(default=None, repr=False)  # nibabel header when the source is NIfTI
    key: str = ""  # identity of the file content (path + mtime + size), used as the engine's cache key

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]


def is_nifti(path: str) -> bool:
    p = path.lower()
    return p.endswith(".nii") or p.endswith(".nii.gz")


def file_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_mtime_ns}|{st.st_size}"


def _squeeze_to_3d(arr: np.ndarray, path: str) -> np.ndarray:
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4:  # a 4D series: use its first volume, as the viewers show it first
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{os.path.basename(path)}: expected a 3D volume, got an array of shape {arr.shape}")
    return arr


def _sitk_affine(img) -> np.ndarray:
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = np.asarray(img.GetOrigin(), dtype=np.float64)
    return _LPS_RAS @ lps


def load_volume(path: str, dtype: Any = None) -> Volume:
    """THE volume loader (server, train task, evaluator, training data): a 3D volume (NIfTI, NRRD, MHA, ... or a
    DICOM series folder) as stored, without reorienting it. ``dtype``: the voxels cast to it (NIfTI: scaled
    straight into it by nibabel, without a float64 copy); None keeps the file's (scaled) type."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    key = file_key(path)
    if is_nifti(path):
        import nibabel as nib

        img = nib.load(path)
        data = np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
        arr = _squeeze_to_3d(data, path)  # scl_slope/scl_inter applied by nibabel
        return Volume(np.asarray(arr), np.asarray(img.affine, dtype=np.float64), path, img.header, key)

    import SimpleITK as sitk

    if os.path.isdir(path):
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(path)
        if not files:
            raise ValueError(f"no DICOM series found in folder {path!r}")
        reader.SetFileNames(files)
        img = reader.Execute()
    else:
        img = sitk.ReadImage(path)
    if img.GetDimension() != 3:
        raise ValueError(f"{os.path.basename(path)}: expected a 3D volume, got {img.GetDimension()}D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{os.path.basename(path)}: multi-component (e.g. RGB) images are not supported")
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # sitk gives [k, j, i]
    arr = np.ascontiguousarray(arr if dtype is None else arr.astype(dtype, copy=False))
    return Volume(arr, _sitk_affine(img), path, None, key)
