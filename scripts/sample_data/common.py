"""What every step of ``fetch_sample_data.py`` shares: the log, the error, and the writers of output files, each
through ``lib.io.atomic.atomic_write_via`` (temporary file beside the target, fsync, ``os.replace``; the usual
permissions): an interrupted run leaves the old file or the new one, never a truncated one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

_APP = str(Path(__file__).resolve().parents[2] / "apps" / "ensam")
if _APP not in sys.path:
    sys.path.insert(0, _APP)

from lib.io.atomic import atomic_write_via  # noqa: E402

__all__ = ["log", "FetchError", "write_sitk", "write_nib", "write_bytes", "write_text", "copy_file", "write_json",
           "check_same_grid", "present_labels", "atomic_write_via"]


def log(msg: str) -> None:
    print(f"[fetch_sample_data] {msg}", flush=True)


class FetchError(RuntimeError):
    pass


def _suffix(path: Path) -> str:
    """The extension a format-by-extension writer needs on the temporary file (``.nii.gz`` counts as one)."""
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def write_sitk(img, path: Path) -> None:
    import SimpleITK as sitk

    atomic_write_via(str(path), lambda tmp: sitk.WriteImage(img, tmp, True), suffix=_suffix(path))


def write_nib(data, affine, path: Path, dtype) -> None:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    atomic_write_via(str(path), lambda tmp: nib.save(img, tmp), suffix=_suffix(path))


def write_bytes(src, path: Path) -> None:
    """The rest of the open binary file ``src`` as ``path``."""
    import shutil

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            shutil.copyfileobj(src, fh)

    atomic_write_via(str(path), write)


def write_text(text: str, path: Path) -> None:
    atomic_write_via(str(path), lambda tmp: Path(tmp).write_text(text))


def copy_file(src: Path, dst: Path) -> bool:
    import shutil

    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return False
    atomic_write_via(str(dst), lambda tmp: shutil.copyfile(src, tmp))
    return True


def write_json(path: Path, obj: dict, force: bool) -> None:
    if path.is_file() and not force:
        log(f"have {path} (skip)")
        return
    write_text(json.dumps(obj, indent=2) + "\n", path)
    log(f"wrote {path}")


def check_same_grid(a, b, what: str) -> None:
    """FetchError unless the two nibabel images share shape and affine (an image and its labels)."""
    import numpy as np

    if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise FetchError(f"{what} are not on the same grid")


def present_labels(label_path: Path, names: dict) -> dict:
    import nibabel as nib
    import numpy as np

    ids = np.unique(np.asarray(nib.load(str(label_path)).dataobj))
    out = {}
    for i in ids.tolist():
        if i == 0:
            continue
        out[str(int(i))] = names.get(int(i), f"label_{int(i)}")
    return out
