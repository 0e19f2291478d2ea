"""Reading volumes exactly as stored and writing masks on the same grid.

Conventions (docs/ARCHITECTURE.md): arrays are indexed ``[i, j, k]`` as the file stores them, with a 4x4 ``affine``
mapping voxel index -> world millimetres in RAS (the NIfTI convention). No reorientation and no resampling happen
here: the engine owns the geometry.

NIfTI goes through nibabel (its affine is already RAS). Every other format SimpleITK reads (NRRD, MHA, a DICOM
series folder) goes through SimpleITK, whose LPS geometry is converted to a RAS affine.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Tuple

import numpy as np

from ..cache import ByteLRU
from ..geometry import spacing_from_affine
from .volumes import _LPS_RAS, Volume, file_key, is_nifti, load_volume  # noqa: F401 (re-exported)


def volume_shape_of_upload(path: str, what: str = "image", max_voxels: int = 2**30) -> Tuple[int, int, int]:
    """The ``[i, j, k]`` shape of an uploaded file, checked to be a readable 3D volume of at most ``max_voxels``
    voxels (the header is read first, so an oversized volume is refused before its voxels are decoded; then the
    whole file is read the way inference reads it, so a truncated or corrupt file is refused too).

    Raises :class:`~lib.infers.request_parsing.RequestError` (400, or 413 for too many voxels) naming ``what``."""
    from lib.infers.request_parsing import RequestError  # (lib.infers imports monailabel: only here)

    name = os.path.basename(path)
    try:
        if is_nifti(path):
            import nibabel as nib

            dims = tuple(int(d) for d in nib.load(path).shape)
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            dims = tuple(int(d) for d in reader.GetSize()) + (
                (reader.GetNumberOfComponents(),) if reader.GetNumberOfComponents() > 1 else ())
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the readers raise for a file that is not an image
        why = str(e).replace(path, name)
        raise RequestError(f"the uploaded {what} ({name}) is not a readable image: {type(e).__name__}: {why}") from None
    if len(dims) < 3 or any(d < 1 for d in dims):
        raise RequestError(f"the uploaded {what} ({name}) is not a 3D volume: its shape is {list(dims)}")
    voxels = int(np.prod(dims, dtype=np.int64))  # all of it is decoded, a 4D series' other volumes included
    if voxels > max_voxels:
        raise RequestError(f"the uploaded {what} ({name}) has {voxels} voxels; at most {max_voxels} are accepted",
                           status_code=413)
    if any(d > 1 for d in dims[3:]):  # inference would silently use the first volume / component only
        raise RequestError(f"the uploaded {what} ({name}) is not one 3D volume: its shape is {list(dims)} (a 4D "
                           f"series or a multi-component image); upload a single 3D volume")
    if min(dims[:3]) < 2:
        raise RequestError(f"the uploaded {what} ({name}) is a single slice (shape {list(dims[:3])}), not a 3D "
                           f"volume")
    missing = _nifti_data_missing(path) if is_nifti(path) else None
    if missing:  # checked before decoding: a small file declaring a huge volume must not allocate it
        raise RequestError(f"the uploaded {what} ({name}) is truncated: its header declares {missing[0]} bytes of "
                           f"voxel data, the file holds {missing[1]}")
    try:
        vol = load_volume(path)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated data, a 4D series with several components, ...
        why = str(e).replace(path, name)
        raise RequestError(f"the uploaded {what} ({name}) cannot be read as a 3D volume: "
                           f"{type(e).__name__}: {why}") from None
    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise RequestError(f"the uploaded {what} ({name}) has {bad} voxels that are NaN or infinite")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise RequestError(f"the uploaded {what} ({name}) has voxels of type {arr.dtype}, not numbers")
    return vol.shape


def _nifti_data_missing(path: str) -> Optional[Tuple[int, int]]:
    """(declared, present) voxel-data bytes of a NIfTI file when it holds less than its header declares, else None.
    A ``.nii.gz`` is decompressed as a stream (nothing is kept), stopping as soon as enough bytes were seen."""
    import gzip
    import zlib

    import nibabel as nib

    hdr = nib.load(path).header
    offset = int(hdr.get_data_offset())
    need = offset + int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * int(hdr.get_data_dtype().itemsize)
    if not path.lower().endswith(".gz"):
        have = os.path.getsize(path)
        return (need - offset, max(have - offset, 0)) if have < need else None
    have = 0
    try:
        with gzip.open(path, "rb") as f:
            while have < need:
                chunk = f.read(min(1 << 22, need - have))
                if not chunk:
                    break
                have += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass  # a corrupt stream: counted up to where it broke
    return (need - offset, max(have - offset, 0)) if have < need else None


def volume_shape(path: str) -> Tuple[int, int, int]:
    """The ``[i, j, k]`` shape ``load_volume(path)`` gives, from the header alone when the file has one."""
    if os.path.isdir(path):  # a DICOM series
        return load_volume(path).shape
    if is_nifti(path):
        import nibabel as nib

        dims = [int(d) for d in nib.load(path).shape]
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        dims = [int(d) for d in reader.GetSize()]
    while len(dims) > 3 and dims[-1] == 1:  # as _squeeze_to_3d
        dims.pop()
    if len(dims) != 3 and not (len(dims) == 4 and is_nifti(path)):
        return load_volume(path).shape  # raises the reader's own error
    return tuple(dims[:3])  # type: ignore[return-value]


class VolumeCache:
    """A tiny LRU of loaded volumes keyed by file identity, so that repeated clicks do not re-read the file."""

    def __init__(self, max_items: int = 2):
        self.max_items = max(0, int(max_items))
        self._items = ByteLRU(max_items=self.max_items)

    def get(self, path: str) -> Volume:
        """The volume of ``path`` (FileNotFoundError when there is none: the one existence check of a click)."""
        if not path:
            raise FileNotFoundError(f"image file not found: {path!r}")
        key = file_key(path)  # its stat raises FileNotFoundError for a missing file
        vol = self._items.get(key)
        if vol is not None:
            return vol
        vol = load_volume(path)
        if self.max_items:
            self._items.put(key, vol)
        return vol

    def clear(self):
        self._items.clear()


_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}


def write_mask(
    mask: np.ndarray,
    reference: Volume,
    extension: Optional[str] = None,
    dtype: Optional[str] = None,
    compress: bool = True,
    directory: Optional[str] = None,
) -> str:
    """Write ``mask`` (indexed ``[i, j, k]`` on ``reference``'s grid) to a new temporary file and return its path.

    ``extension`` ``.nii.gz`` (default) / ``.nii`` keeps the reference NIfTI header (same affine, qform and sform
    codes); ``.nrrd`` / ``.seg.nrrd`` / ``.mha`` / ``.nii`` via SimpleITK use the same geometry converted to LPS.
    """
    mask = np.asarray(mask)
    if mask.shape[:3] != reference.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image shape {reference.shape}")
    ext = (extension or ".nii.gz").strip()
    if not ext.startswith("."):
        ext = "." + ext
    np_dtype = _DTYPES.get(str(dtype).lower(), np.uint8) if dtype else np.uint8
    # NIfTI and NRRD store the first index fastest (Fortran order): nibabel writes a C-ordered array in small
    # transposed chunks (a 512x512x61 uint8 mask: 196 ms; 65 ms when Fortran-ordered, 47 ms for the transpose;
    # 2026-11-30, 2 busy cores). The engine answers in Fortran order, so no copy is made for it here.
    data = np.asfortranarray(mask.astype(np_dtype, copy=False))
    fd, out = tempfile.mkstemp(suffix=ext, prefix="ensam_", dir=directory)
    os.close(fd)

    if ext.lower() in (".nii", ".nii.gz"):
        import nibabel as nib

        if reference.header is not None and isinstance(reference.header, nib.Nifti1Header):
            hdr = reference.header.copy()
            hdr.set_data_dtype(np_dtype)
            hdr.set_slope_inter(1.0, 0.0)
            img = nib.Nifti1Image(data, reference.affine, header=hdr)
            img.set_qform(reference.header.get_qform(), code=int(reference.header["qform_code"]) or 1)
            img.set_sform(reference.header.get_sform(), code=int(reference.header["sform_code"]) or 1)
        else:
            img = nib.Nifti1Image(data, reference.affine)
            img.set_qform(reference.affine, code=1)
            img.set_sform(reference.affine, code=1)
        nib.save(img, out)
        return out

    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    lps = _LPS_RAS @ np.asarray(reference.affine, dtype=np.float64)
    spacing = spacing_from_affine(lps)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing[None, :]).ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    sitk.WriteImage(img, out, bool(compress))
    return out
