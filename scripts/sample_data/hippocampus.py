#!/usr/bin/env python3
"""Rebuild ``sample-datasets/hippocampus/`` (committed to git) from a snapshot of a public GitHub repository that
holds the Medical Segmentation Decathlon Task04 Hippocampus training set (CC BY-SA 4.0).

Usage (from the repository root; ``--snapshot`` is the git directory the snapshot was fetched into, e.g. by the
search tool's ``fetch github:WisnuMulya/hippocampal-volume-quantification``, or any clone of that repository)::

    python scripts/sample_data/hippocampus.py --snapshot /path/to/repo.git [--out sample-datasets/hippocampus]
    python scripts/sample_data/hippocampus.py --snapshot ... --check   # re-derive, compare with the committed files

What it does, deterministically (a rebuild gives byte-identical files):

1. Reads every ``data/TrainingSet/{images,labels}/hippocampus_NNN.nii.gz`` blob of the pinned commit
   (:data:`SOURCE_COMMIT`) with ``git cat-file``; each blob's sha256 must be the one pinned in ``MANIFEST.json``
   (``sources``), as every download of :mod:`.pinned` is. Subjects without an image (010 and 281: the snapshot
   drops files of 4 MiB or more) or without a label (118) are left out and listed.
2. Converts: float32 images are rounded to int16 (the measured loss is written to the manifest: at most 0.5
   intensity units, or, for the few images whose values exceed the int16 range (up to ~1.7e6), int16 with the
   NIfTI scale factor ``scl_slope`` = max / 32000; the manifest records each image's largest error as a fraction
   of its 0.5-99.5 percentile range); uint8 images stay uint8; labels stay uint8 (0 background, 1 anterior,
   2 posterior hippocampus). The header (1 mm grid, affine) is the original one. Written as gzip level 9 with no name and mtime 0, through
   ``lib.io.atomic.atomic_write_via``.
3. Writes ``dataset.json`` (the pairs, the label names) and ``split.json``: a three-way split of the subjects by a
   keyed hash (:data:`SPLIT_KEY`): :data:`N_LOOP` subjects for the labelling loop (never trained on),
   :data:`N_TUNE` for the tuning split (``--split tune-hippocampus`` of ``lib.evaluation``), the rest for
   training (the ``hippocampus`` sample source of ``lib.training.data``), up to :data:`N_KEEP` subjects in
   all (size); the others are listed as not copied.

``MANIFEST.json`` holds, for each subject, the sha256 of both originals and of both committed files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

_SCRIPTS = str(Path(__file__).resolve().parents[1])
if _SCRIPTS not in sys.path:  # run as a script: the sample_data package is beside this file
    sys.path.insert(0, _SCRIPTS)

from sample_data.common import FetchError, atomic_write_via, check_same_grid, log  # noqa: E402

__all__ = ["SOURCE_REPO", "SOURCE_COMMIT", "SPLIT_KEY", "N_LOOP", "N_TUNE", "LABELS", "build", "split_subjects"]

SOURCE_REPO = "https://github.com/WisnuMulya/hippocampal-volume-quantification"
SOURCE_COMMIT = "f1c5a0f520d6c9b07979108237dd608da321407d"
SOURCE_DIR = "data/TrainingSet"
LABELS = {1: "hippocampus_anterior", 2: "hippocampus_posterior"}
UNION, UNION_VALUE = "hippocampus", 3  # anterior + posterior: the third structure (lib.cohorts)
SPLIT_KEY = "ensam/hippocampus-split/v1"
N_LOOP, N_TUNE = 20, 12
# subjects copied: the first N_KEEP in the keyed order (all 260 complete pairs would add ~18 MB to git even as
# int16, ~15 MB as 8-bit; this copy: ~11 MB, near-lossless)
N_KEEP = 168
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "sample-datasets" / "hippocampus"
_NAME = re.compile(r"hippocampus_(\d{3})\.nii\.gz")


def _git(snapshot: Path, *args: str) -> bytes:
    proc = subprocess.run(["git", "--git-dir", str(snapshot), *args], capture_output=True)
    if proc.returncode != 0:
        raise FetchError(f"git {' '.join(args)} in {snapshot}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _git_dir(path: Path) -> Path:
    """The git directory of ``path`` (a bare repository, a clone's work tree or its .git)."""
    for cand in (path, path / ".git", path / "repo"):
        if (cand / "HEAD").is_file() and (cand / "objects").is_dir():
            return cand
    raise FetchError(f"{path}: not a git directory (no HEAD and objects/)")


def list_blobs(snapshot: Path) -> dict:
    """{(kind, subject id): blob sha1} for the image and label files of the pinned commit."""
    out = {}
    for line in _git(snapshot, "ls-tree", SOURCE_COMMIT, f"{SOURCE_DIR}/images/", f"{SOURCE_DIR}/labels/") \
            .decode().splitlines():
        meta, path = line.split("\t", 1)
        m = _NAME.fullmatch(Path(path).name)
        if m:
            out[(Path(path).parent.name, m.group(1))] = meta.split()[2]
    return out


def read_blob(snapshot: Path, sha1: str):
    """The blob's bytes, or None when the snapshot lacks it (large files are dropped from snapshots)."""
    proc = subprocess.run(["git", "--git-dir", str(snapshot), "cat-file", "blob", sha1], capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nifti_gz(img) -> bytes:
    """``img`` as .nii.gz bytes, reproducibly (gzip level 9, no file name, mtime 0)."""
    return gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)


def _load(data: bytes):
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def convert_image(img):
    """(new image, conversion record): float -> int16 by rounding (refused if out of range), integer kept."""
    import nibabel as nib
    import numpy as np

    a = np.asanyarray(img.dataobj)
    rec = {"source_dtype": str(a.dtype)}
    slope = 1.0
    if np.issubdtype(a.dtype, np.integer):
        out = a
    else:
        a64 = a.astype(np.float64)
        peak = float(np.abs(a64).max())
        if peak > 32767:  # a few images span up to ~1.7e6: int16 with the NIfTI scale factor scl_slope
            slope = float(np.float32(peak / 32000.0))
        r = np.rint(a64 / slope)
        err = float(np.abs(r * slope - a64).max())
        lo, hi = np.percentile(a64, [0.5, 99.5])
        rec.update(scl_slope=slope, max_abs_error=round(err, 4),
                   range_0p5_99p5=[round(float(lo), 3), round(float(hi), 3)],
                   max_error_fraction_of_range=round(err / max(float(hi - lo), 1e-6), 7))
        out = r.astype(np.int16)
    hdr = img.header.copy()
    hdr.set_data_dtype(out.dtype)
    new = nib.Nifti1Image(out, img.affine, hdr)
    new.header["scl_slope"], new.header["scl_inter"] = slope, 0.0
    rec["dtype"] = str(out.dtype)
    return new, rec


def convert_label(img):
    import nibabel as nib
    import numpy as np

    a = np.asanyarray(img.dataobj)
    vals = set(np.unique(a).tolist())
    if not vals <= {0, 1, 2} or not vals & {1, 2}:
        raise FetchError(f"label values {sorted(vals)} are not a non-empty subset of 0, 1, 2")
    hdr = img.header.copy()
    hdr.set_data_dtype(np.uint8)
    new = nib.Nifti1Image(np.rint(a).astype(np.uint8), img.affine, hdr)
    new.header["scl_slope"], new.header["scl_inter"] = 1.0, 0.0
    return new, {"voxels": {LABELS[k]: int((a == k).sum()) for k in (1, 2)}}


def split_subjects(ids, keep: int = N_KEEP) -> dict:
    """{"loop": [...], "tune": [...], "train": [...], "not_copied": [...]}: subjects ordered by
    sha256(SPLIT_KEY/id); the first N_LOOP go to the labelling loop, the next N_TUNE to tuning, the next ones up to
    ``keep`` to training, the rest are not copied (each list sorted). A larger ``keep`` only adds training subjects:
    the loop and tuning subjects stay the same."""
    order = sorted(ids, key=lambda s: hashlib.sha256(f"{SPLIT_KEY}/{s}".encode()).hexdigest())
    return {"loop": sorted(order[:N_LOOP]), "tune": sorted(order[N_LOOP:N_LOOP + N_TUNE]),
            "train": sorted(order[N_LOOP + N_TUNE:keep]), "not_copied": sorted(order[keep:])}


def _write_bytes(data: bytes, path: Path) -> None:
    atomic_write_via(str(path), lambda tmp: Path(tmp).write_bytes(data))


def build(snapshot: Path, out: Path = OUT, check_only: bool = False, record: bool = False) -> dict:
    """Rebuild (or, ``check_only``, compare with) the committed files. ``record``: write the pinned sha256 of
    the sources into a new manifest instead of checking them (first build only)."""
    snapshot = _git_dir(Path(snapshot))
    manifest_path = out / "MANIFEST.json"
    pinned = {} if record else json.loads(manifest_path.read_text())["sources"]
    blobs = list_blobs(snapshot)
    ids = sorted({sid for _, sid in blobs})
    subjects, missing, sources = {}, {}, {}
    for sid in ids:
        raw = {}
        for kind in ("images", "labels"):
            name = f"{SOURCE_DIR}/{kind}/hippocampus_{sid}.nii.gz"
            blob = blobs.get((kind, sid))
            data = read_blob(snapshot, blob) if blob else None
            if data is None:
                missing.setdefault(sid, []).append(f"{kind}: " + ("not in the commit" if blob is None else
                                                                  "not in the snapshot (file of 4 MiB or more)"))
                continue
            digest = sha256(data)
            if not record and pinned.get(name) != digest:
                raise FetchError(f"{name}: sha256 {digest} != pinned {pinned.get(name)}")
            sources[name] = digest
            raw[kind] = data
        if len(raw) == 2:
            subjects[sid] = raw
    split = split_subjects(sorted(subjects))
    kept = sorted(split["loop"] + split["tune"] + split["train"])
    files, records = {}, {}
    for sid in kept:
        raw = subjects[sid]
        src_img, src_lab = _load(raw["images"]), _load(raw["labels"])
        check_same_grid(src_img, src_lab, f"hippocampus_{sid} image and label")
        img, rec_i = convert_image(src_img)
        lab, rec_l = convert_label(src_lab)
        files[f"imagesTr/hippocampus_{sid}.nii.gz"] = nifti_gz(img)
        files[f"labelsTr/hippocampus_{sid}.nii.gz"] = nifti_gz(lab)
        records[sid] = {"shape": list(src_img.shape), "image": rec_i, "label": rec_l,
                        "source_sha256": {"image": sources[f"{SOURCE_DIR}/images/hippocampus_{sid}.nii.gz"],
                                          "label": sources[f"{SOURCE_DIR}/labels/hippocampus_{sid}.nii.gz"]}}
    # the union is a structure of its own (value UNION_VALUE, not in the label files: ``unions`` defines it)
    names = {**{str(k): v for k, v in LABELS.items()}, str(UNION_VALUE): UNION}
    unions = {str(UNION_VALUE): sorted(LABELS)}
    dataset = {
        "name": "MSD Task04 Hippocampus (ensam copy)", "licence": "CC BY-SA 4.0",
        "source": f"{SOURCE_REPO} @ {SOURCE_COMMIT}, {SOURCE_DIR}/", "modality": "MR",
        "labels": names, "unions": unions,
        "training": [{"id": f"hippocampus_{sid}", "image": f"imagesTr/hippocampus_{sid}.nii.gz",
                      "label": f"labelsTr/hippocampus_{sid}.nii.gz", "modality": "MR", "labels": names,
                      "unions": unions} for sid in kept]}
    split_doc = {"key": SPLIT_KEY, "rule": f"subjects ordered by sha256('{SPLIT_KEY}/<id>'): the first {N_LOOP} "
                 f"-> loop, the next {N_TUNE} -> tune, the next up to {N_KEEP} -> train, the rest not copied "
                 f"(size)",
                 "structures": [*LABELS.values(), UNION],
                 **{k: [f"hippocampus_{s}" for s in v] for k, v in split.items()}}
    files["dataset.json"] = (json.dumps(dataset, indent=1) + "\n").encode()
    files["split.json"] = (json.dumps(split_doc, indent=1) + "\n").encode()
    manifest = {"source_repository": SOURCE_REPO, "source_commit": SOURCE_COMMIT, "source_dir": SOURCE_DIR,
                "licence": "CC BY-SA 4.0", "left_out": missing, "sources": dict(sorted(sources.items())),
                "subjects": records,
                "files": {k: sha256(v) for k, v in sorted(files.items()) if k.endswith(".nii.gz")}}
    files["MANIFEST.json"] = (json.dumps(manifest, indent=1) + "\n").encode()
    differ = [k for k, v in files.items() if not (out / k).is_file() or (out / k).read_bytes() != v]
    if check_only:
        return {"differ": differ, "subjects": len(kept), "split": {k: len(v) for k, v in split.items()}}
    for k in differ:
        _write_bytes(files[k], out / k)
    log(f"hippocampus: {len(kept)} of {len(subjects)} subjects, {len(differ)} files written, left out "
        f"{sorted(missing)}; split {({k: len(v) for k, v in split.items()})}")
    return {"differ": differ, "subjects": len(kept), "split": {k: len(v) for k, v in split.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshot", required=True, help="git directory of the source repository's snapshot")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    ap.add_argument("--record", action="store_true", help="first build: record the sources' sha256 (no check)")
    a = ap.parse_args(argv)
    try:
        res = build(Path(a.snapshot), Path(a.out), check_only=a.check, record=a.record)
    except FetchError as e:
        log(f"ERROR: {e}")
        return 1
    if a.check:
        log(f"hippocampus --check: {res['subjects']} subjects, {len(res['differ'])} files differ"
            + (f": {res['differ'][:5]}" if res["differ"] else ""))
        return 1 if res["differ"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
