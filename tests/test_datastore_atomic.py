"""lib.monailabel_patches.atomic_datastore.AtomicLocalDatastore: a crash in the middle of a label save or an index
write leaves the old file whole (monailabel's LocalDatastore copied / rewrote in place: a SIGKILL left a 0-byte
label that the restarted server then served, seen with scripts/faults.py on the stock datastore)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from lib.monailabel_patches import atomic_datastore as D
from lib.io import atomic


@pytest.fixture
def store(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(studies / "img.nii.gz"))
    return D.AtomicLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)


def _label(tmp_path, value, name):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, np.uint8), np.eye(4)), str(p))
    return str(p)


def test_crash_during_a_label_save_keeps_the_old_label(store, tmp_path, monkeypatch):
    store.save_label("img", _label(tmp_path, 1, "a.nii.gz"), "final", {"label_info": [{"name": "x", "idx": 1}]})
    dest = store.get_label_uri("img", "final")
    old = open(dest, "rb").read()
    index = store._datastore_config_path
    old_index = open(index).read()

    def half_then_die(src, dst, *a):  # the process dies half way through the copy
        dst.write(src.read()[:10])
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(atomic.shutil, "copyfileobj", half_then_die)  # the writer of lib.io.atomic
    with pytest.raises(KeyboardInterrupt):
        store.save_label("img", _label(tmp_path, 2, "b.nii.gz"), "final", {})
    monkeypatch.undo()
    assert open(dest, "rb").read() == old and open(index).read() == old_index
    assert not [f for f in os.listdir(os.path.dirname(dest)) if f.endswith(atomic.TMP_SUFFIX)]
    store.save_label("img", _label(tmp_path, 2, "b.nii.gz"), "final", {})
    assert nib.load(dest).get_fdata().max() == 2


def test_crash_during_an_index_write_keeps_the_old_index(store, tmp_path, monkeypatch):
    index = store._datastore_config_path
    before = json.load(open(index))

    def die(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(D.os, "fsync", die)  # dies after writing the temporary file, before the rename
    with pytest.raises(KeyboardInterrupt):
        store.save_label("img", _label(tmp_path, 3, "c.nii.gz"), "final", {})
    monkeypatch.undo()
    assert json.load(open(index)) == before


def test_dead_writers_temporary_files_are_removed_at_start(tmp_path):
    studies = tmp_path / "s"
    (studies / "labels" / "final").mkdir(parents=True)
    stale = studies / "labels" / "final" / f".img.nii.gz.999999999.abc{atomic.TMP_SUFFIX}"
    stale.write_bytes(b"half")
    D.AtomicLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    assert not stale.exists()
