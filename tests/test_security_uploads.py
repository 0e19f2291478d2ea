"""Issue 25: uploads that escaped their folder or cost far more than they weigh, found by an attack on ``make serve``.

* sessions (``PUT /session/``): monailabel unpacked an uploaded archive with ``shutil.unpack_archive`` (members
  ``../x``, ``/abs/x``, links written outside the session folder) and skipped every volume check; ensam's own route
  extracts member by member (``lib.io.archive``) and checks the volume like every other upload;
* cheap uploads that cost a lot: a huge NIfTI header extension, a tiny DICOM declaring a huge image, a grid whose
  physical extent makes the atlas route crawl (voxel spacing, extent);
* broken geometry (NaN / infinite / zero / singular affines, 1e+-30 scales) refused at upload, and a failed mask
  write leaves no temporary file;
* ``result_extension=".mhd"`` (a header whose voxel file was left behind) refused;
* links in the studies folder are neither listed, served, zipped, deleted through nor written through.

Unit tests need no server; the HTTP tests share one server of their own (sessions on, a private TMPDIR so that any
temporary file a request leaves is seen, a studies folder holding links)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import tarfile
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import BLOBS, EnsamServer, _copy_app, free_port, launch, server_cmd, server_env, synthetic_volume, \
    wait_ready

TIMEOUT = 120
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DICOM_DIR = os.path.join(ROOT, "sample-datasets", "dicom", "ct")


def _dicom_files(n: int = 3) -> list:
    files = sorted(f for f in os.listdir(DICOM_DIR) if f.endswith(".dcm")) if os.path.isdir(DICOM_DIR) else []
    out = []
    for f in files[:n]:
        with open(os.path.join(DICOM_DIR, f), "rb") as fh:
            out.append((f, fh.read()))
    return out


needs_dicom = pytest.mark.skipif(not _dicom_files(), reason="sample DICOM series missing (make data)")


# ---------------------------------------------------------------------------------------------------- payloads
def _tar(members, gz: bool = False) -> bytes:
    """A tar archive of ``members``: (name, kind, data) with kind file / dir / symlink / hardlink / fifo / chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, data in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            if kind == "file":
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                       "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                ti.linkname = data
            t.addfile(ti)
    return buf.getvalue()


def _zip(members) -> bytes:
    """A zip archive of ``members``: (name, kind, data) with kind file / dir / symlink (a Unix link entry)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, kind, data in members:
            zi = zipfile.ZipInfo(name)
            zi.create_system = 3
            if kind == "symlink":
                zi.external_attr = (stat.S_IFLNK | 0o777) << 16
                z.writestr(zi, data)
            elif kind == "dir":
                zi.external_attr = (stat.S_IFDIR | 0o755) << 16
                z.writestr(zi, b"")
            else:
                zi.external_attr = (stat.S_IFREG | 0o644) << 16
                z.writestr(zi, data)
    return buf.getvalue()


def _nii(array, affine=None, gz: bool = True) -> bytes:
    raw = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine).to_bytes()
    return gzip.compress(raw) if gz else raw


def _nii_with_sform(shape, sform, gz: bool = True) -> bytes:
    """A float32 NIfTI whose affine is ``sform`` written into the header as is (nibabel would refuse to make it)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    hdr["pixdim"][1:4] = 1.0
    hdr["qform_code"] = 0
    hdr["sform_code"] = 1
    sform = np.asarray(sform, dtype=np.float64)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
    data = np.random.default_rng(0).normal(size=shape).astype("<f4").tobytes(order="F")
    raw = hdr.binaryblock + b"\x00" * 4 + data
    return gzip.compress(raw) if gz else raw


def _nii_with_extension(n_bytes: int) -> bytes:
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"\x00" * n_bytes))
    return gzip.compress(img.to_bytes(), compresslevel=1)


def _dicom_declaring(rows: int, cols: int, frames: int, data: bytes = b"\x00" * 64) -> bytes:
    """A DICOM file (meta header, explicit VR little endian) declaring ``rows x cols x frames`` 16-bit pixels and
    holding only ``data``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = data
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- unit: archive
def _extract(tmp_path, data: bytes, name: str = "upload.tar", **limits):
    from lib.io.archive import extract_archive

    src = tmp_path / name
    src.write_bytes(data)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)  # extract_archive wants a new folder
    return extract_archive(str(src), str(tmp_path / "out"), **limits)


def test_archive_extracts_regular_files_and_folders(tmp_path):
    files = _extract(tmp_path, _tar([("./", "dir", None), ("series/", "dir", None), ("series/a.dcm", "file", b"A"),
                                     ("./series/b.dcm", "file", b"BB")], gz=True), "up.tar.gz")
    out = tmp_path / "out"
    assert sorted(os.path.relpath(f, out) for f in files) == ["series/a.dcm", "series/b.dcm"]
    assert (out / "series" / "b.dcm").read_bytes() == b"BB"
    (tmp_path / "z").mkdir()
    files = _extract(tmp_path / "z", _zip([("s/", "dir", None), ("s/c.dcm", "file", b"C")]), "up2.zip")
    assert [os.path.basename(f) for f in files] == ["c.dcm"]


def _bad_members(tmp_path):
    escape = "../" * 12 + str(tmp_path / "escaped").lstrip("/")
    return [
        ("tar: absolute path", _tar([(str(tmp_path / "escaped"), "file", b"x")]), "absolute"),
        ("tar: ../ escaping", _tar([(escape, "file", b"x")]), ".."),
        ("tar: .. inside a path", _tar([("a/../../escaped", "file", b"x")]), ".."),
        ("tar: symlink", _tar([("link", "symlink", str(tmp_path))]), "link"),
        ("tar: symlink then a file through it", _tar([("link", "symlink", str(tmp_path)),
                                                      ("link/escaped", "file", b"x")]), "link"),
        ("tar: hardlink", _tar([("h", "hardlink", "/etc/passwd")]), "link"),
        ("tar: fifo", _tar([("f", "fifo", None)]), "fifo"),
        ("tar: character device", _tar([("c", "chr", None)]), "device"),
        ("tar: the same name twice", _tar([("a.dcm", "file", b"1"), ("a.dcm", "file", b"2")]), "twice"),
        ("zip: ../ escaping", _zip([(escape, "file", b"x")]), ".."),
        ("zip: absolute path", _zip([(str(tmp_path / "escaped"), "file", b"x")]), "absolute"),
        ("zip: symlink", _zip([("link", "symlink", str(tmp_path).encode())]), "link"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_archive_members_that_could_escape_are_refused(tmp_path, case):
    from lib.io.archive import ArchiveError

    name, data, word = _bad_members(tmp_path)[case]
    with pytest.raises(ArchiveError) as e:
        _extract(tmp_path, data, "up.zip" if name.startswith("zip") else "up.tar")
    assert e.value.status_code == 400 and word in str(e.value), (name, str(e.value))
    assert not (tmp_path / "escaped").exists(), name
    assert not (tmp_path / "out").exists(), name  # nothing half-extracted is left


def test_archive_bounds(tmp_path):
    from lib.io.archive import ArchiveError

    many = _tar([(f"f{i}.dcm", "file", b"x") for i in range(6)])
    with pytest.raises(ArchiveError) as e:
        _extract(tmp_path, many, max_members=5)
    assert e.value.status_code == 413 and "ENSAM_MAX_ARCHIVE_MEMBERS" in str(e.value)
    assert len(_extract(tmp_path, many, max_members=6)) == 6
    for data, name in ((_tar([("big", "file", b"\x00" * 5000)], gz=True), "b.tar.gz"),
                       (_zip([("a", "file", b"\x00" * 3000), ("b", "file", b"\x00" * 3000)]), "b.zip")):
        with pytest.raises(ArchiveError) as e:
            _extract(tmp_path, data, name, max_bytes=4000)
        assert e.value.status_code == 413 and "ENSAM_MAX_ARCHIVE_MB" in str(e.value), str(e.value)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ArchiveError) as e:
        _extract(tmp_path, b"not an archive at all", "x.tar")
    assert e.value.status_code == 400 and "tar" in str(e.value) and "zip" in str(e.value)


# ---------------------------------------------------------------------------------------------------- unit: uploads
def _refused(tmp_path, data: bytes, name: str):
    """The RequestError the upload check raises for ``data`` saved as ``name`` (fails when it is accepted)."""
    from lib.io.imageio import volume_shape_of_upload

    path = tmp_path / name
    path.write_bytes(data)
    t0 = time.time()
    try:
        shape = volume_shape_of_upload(str(path))
    except Exception as e:  # noqa: BLE001
        assert type(e).__name__ == "RequestError", repr(e)
        assert time.time() - t0 < 10, f"refused only after {time.time() - t0:.1f} s"
        return e
    raise AssertionError(f"{name} was accepted as a volume of shape {shape}")


def test_nifti_header_extensions_are_bounded(tmp_path):
    e = _refused(tmp_path, _nii_with_extension(20 * 2**20), "ext.nii.gz")
    assert e.status_code == 413 and "ENSAM_MAX_NIFTI_EXTENSION_MB" in str(e), str(e)
    from lib.io.imageio import volume_shape_of_upload

    ok = tmp_path / "small_ext.nii.gz"
    ok.write_bytes(_nii_with_extension(4096))  # a small extension (a comment) is fine
    assert volume_shape_of_upload(str(ok)) == (8, 8, 8)


def test_dicom_declaring_more_pixels_than_it_holds_is_refused_before_decoding(tmp_path):
    e = _refused(tmp_path, _dicom_declaring(2000, 2000, 3), "small.dcm")
    assert e.status_code == 400 and "24000000" in str(e), str(e)
    e = _refused(tmp_path, _dicom_declaring(18000, 18000, 3), "bomb.dcm")  # the attack: +3.7 GB, 44 s before
    assert e.status_code == 400 and "1944000000" in str(e), str(e)


@needs_dicom
def test_a_dicom_series_folder_is_checked_like_a_file(tmp_path):
    from lib.io.imageio import volume_shape_of_upload

    series = tmp_path / "series"
    series.mkdir()
    for name, data in _dicom_files(3):
        (series / name).write_bytes(data)
    assert volume_shape_of_upload(str(series)) == (512, 512, 3)
    (series / "bomb.dcm").write_bytes(_dicom_declaring(2000, 2000, 3))
    with pytest.raises(Exception) as e:
        volume_shape_of_upload(str(series))
    assert type(e.value).__name__ == "RequestError" and "bomb.dcm" in str(e.value), str(e.value)
    empty = tmp_path / "not_dicom"
    empty.mkdir()
    (empty / "a.txt").write_bytes(b"text")
    with pytest.raises(Exception) as e:
        volume_shape_of_upload(str(empty))
    assert type(e.value).__name__ == "RequestError" and "DICOM" in str(e.value), str(e.value)


def test_voxel_spacing_and_extent_are_bounded(tmp_path):
    vol = np.random.default_rng(1).normal(size=(32, 32, 16)).astype(np.float32)
    e = _refused(tmp_path, _nii(vol, np.diag([40.0, 40.0, 40.0, 1.0])), "coarse.nii.gz")  # ensam_seg: 228 s
    assert e.status_code == 400 and "ENSAM_MAX_SPACING_MM" in str(e), str(e)
    e = _refused(tmp_path, _nii(vol, np.diag([0.001, 1.0, 1.0, 1.0])), "fine.nii.gz")
    assert e.status_code == 400 and "ENSAM_MIN_SPACING_MM" in str(e), str(e)
    long = np.zeros((8, 8, 1100), np.float32)  # 2200 mm along k
    e = _refused(tmp_path, _nii(long, np.diag([1.0, 1.0, 2.0, 1.0])), "long.nii.gz")
    assert e.status_code == 413 and "ENSAM_MAX_EXTENT_MM" in str(e), str(e)
    from lib.io.imageio import volume_shape_of_upload

    ok = tmp_path / "ok.nii.gz"
    ok.write_bytes(_nii(vol, np.diag([0.7, 0.7, 5.0, 1.0])))
    assert volume_shape_of_upload(str(ok)) == (32, 32, 16)


_SING = np.eye(4)
_SING[:3, 1] = _SING[:3, 0]  # two parallel axes
_SHEAR = np.eye(4)
_SHEAR[2, 1] = 0.5  # a tilted (sheared) grid is a valid one
BROKEN_AFFINES = [
    ("NaN", np.where(np.eye(4) > 0, np.nan, 0.0), "NaN"),
    ("inf", np.diag([np.inf, 1.0, 1.0, 1.0]), "infinite"),
    ("zero", np.zeros((4, 4)), "spacing"),
    ("singular (parallel axes)", _SING, "singular"),
    ("1e+30 scale", np.diag([1e30, 1e30, 1e30, 1.0]), "spacing"),
    ("1e-30 scale", np.diag([1e-30, 1e-30, 1e-30, 1.0]), "spacing"),
    ("1e+30 origin", np.array([[1, 0, 0, 1e30], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "origin"),
]


@pytest.mark.parametrize("name, affine, word", BROKEN_AFFINES, ids=[c[0] for c in BROKEN_AFFINES])
def test_broken_geometry_is_refused(tmp_path, name, affine, word):
    e = _refused(tmp_path, _nii_with_sform((16, 16, 8), affine), "g.nii.gz")
    assert e.status_code == 400 and word in str(e), (name, str(e))


def test_a_valid_sheared_grid_and_a_broken_nrrd(tmp_path):
    from lib.io.imageio import volume_shape_of_upload

    ok = tmp_path / "shear.nii.gz"
    ok.write_bytes(_nii_with_sform((16, 16, 8), _SHEAR))
    assert volume_shape_of_upload(str(ok)) == (16, 16, 8)
    data = np.zeros((8, 16, 16), "<f4").tobytes()
    head = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 16 16 8\n"
            "space directions: (0,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: raw\nendian: little\n\n")
    e = _refused(tmp_path, head.encode() + data, "zero.nrrd")
    assert e.status_code == 400, str(e)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_a_failed_mask_write_leaves_no_temporary_file(tmp_path, ext):
    from lib.io.imageio import Volume, write_mask

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Exception):
        write_mask(np.zeros((4, 4, 4), np.uint8), Volume(np.zeros((4, 4, 4)), np.zeros((4, 4))), extension=ext,
                   directory=str(out))
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------------- the server
SECRET = b"root:$6$secret-hash:19000:0:99999:7:::\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A server with sessions on, a private TMPDIR and sessions folder, and a studies folder holding links: to a
    non-image outside (``shadow``), to a volume outside (``outside``), to a volume inside (``alias``), and a final
    label of vol1 that links outside."""
    work = str(tmp_path_factory.mktemp("security"))
    app_dir = _copy_app(os.path.join(work, "app"))
    studies, secret, tmp, sessions = (os.path.join(work, d) for d in ("studies", "secret", "tmp", "sessions"))
    for d in (studies, secret, tmp, sessions, os.path.join(studies, "labels", "final"), os.path.join(work, "gate")):
        os.makedirs(d, exist_ok=True)
    images = {}
    for n in range(2):
        img, lab, aff = synthetic_volume(n + 1)
        nib.save(nib.Nifti1Image(img, aff), os.path.join(studies, f"vol{n}.nii.gz"))
        images[f"vol{n}"] = (img, lab, aff)
    nib.save(nib.Nifti1Image(images["vol0"][1], images["vol0"][2]),
             os.path.join(studies, "labels", "final", "vol0.nii.gz"))
    with open(os.path.join(secret, "shadow"), "wb") as f:
        f.write(SECRET)
    nib.save(nib.Nifti1Image(images["vol1"][0], images["vol1"][2]), os.path.join(secret, "outside.nii.gz"))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(images["vol1"][1][::-1]), images["vol1"][2]),  # not vol0's label
             os.path.join(secret, "label.nii.gz"))
    os.symlink(os.path.join(secret, "shadow"), os.path.join(studies, "shadow.nii.gz"))
    os.symlink(os.path.join(secret, "outside.nii.gz"), os.path.join(studies, "outside.nii.gz"))
    os.symlink("vol0.nii.gz", os.path.join(studies, "alias.nii.gz"))
    os.symlink(os.path.join(secret, "label.nii.gz"), os.path.join(studies, "labels", "final", "vol1.nii.gz"))
    env = server_env(app_dir, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", MONAI_LABEL_SESSIONS="true",
                     MONAI_LABEL_SESSION_PATH=sessions, TMPDIR=tmp, ENSAM_MAX_ARCHIVE_MEMBERS="64",
                     # the interactive gate (the server's own runtime state, updated by every inference) outside the
                     # TMPDIR these tests watch for leftovers of uploads
                     ENSAM_INTERACTIVE_GATE=os.path.join(work, "gate", "ensam-gate.lock"))
    port = free_port()
    log_path = os.path.join(work, "server.log")
    server = EnsamServer(f"http://127.0.0.1:{port}",
                         launch(server_cmd(app_dir, studies, port, "--conf", "labels", ",".join(BLOBS)), log_path,
                                work, env), log_path, app_dir, studies, work, images)
    server.secret, server.tmp, server.sessions = secret, tmp, sessions
    try:
        wait_ready(server, "/info/", 240, "server")
        yield server
    finally:
        server.stop()


def _tree(root: str) -> dict:
    """path -> (size, mtime) of everything under ``root`` (files, folders, links)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for f in dirs + files:
            p = os.path.join(d, f)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns) if not stat.S_ISDIR(st.st_mode) else "dir"
    return out


def _state(server) -> tuple:
    return _tree(server.studies), _tree(server.tmp), _tree(server.sessions), _tree(server.secret)


def _alive(server):
    r = requests.get(f"{server.url}/info/", timeout=30)
    assert r.status_code == 200 and server.alive(), server.log_tail()


def _put_session(server, files, **params):
    return requests.put(f"{server.url}/session/", params=params,
                        files=[("files", (name, data)) for name, data in files], timeout=TIMEOUT)


def test_session_archive_members_never_land_outside(srv, tmp_path):
    """The attack: ``PUT /session/?uncompress=true`` with members ``../../..``, ``/abs`` and a link followed by a
    file of the same name wrote files outside the session folder, as the server's user."""
    target = tmp_path / "landed"
    escape = "../" * 16 + str(target).lstrip("/")
    before = _state(srv)
    for data, name in ((_tar([("ok.dcm", "file", b"x"), (escape, "file", b"pwned")]), "a.tar"),
                       (_tar([(str(target), "file", b"pwned")], gz=True), "a.tar.gz"),
                       (_tar([("d", "symlink", str(tmp_path)), ("d/landed", "file", b"pwned")]), "a.tar"),
                       (_zip([(escape, "file", b"pwned")]), "a.zip")):
        r = _put_session(srv, [(name, data)], uncompress="true")
        assert r.status_code == 400 and r.json().get("detail"), (name, r.status_code, r.text)
        assert not target.exists(), (name, "a member landed outside the session folder")
        assert _state(srv) == before, name
    _alive(srv)


def test_session_uploads_pass_the_upload_checks(srv):
    vol = np.random.default_rng(2).normal(size=(24, 20, 12)).astype(np.float32)
    nan = vol.copy()
    nan[3, 3, 3] = np.nan
    bomb = nib.Nifti1Header()
    bomb.set_data_shape((1000, 1000, 1000))
    bomb.set_data_dtype(np.float32)
    bomb_bytes = gzip.compress(bomb.binaryblock + b"\x00" * 68)
    cases = [
        ("NaN voxels", [("nan.nii.gz", _nii(nan))], {}, 400, "NaN"),
        ("1000^3 floats declared, 64 bytes held", [("bomb.nii.gz", bomb_bytes)], {}, 400, "truncated"),
        ("NaN voxels in an archive", [("a.tar.gz", _tar([("nan.nii.gz", "file", _nii(nan))], gz=True))],
         {"uncompress": "true"}, 400, "NaN"),
        ("a name with a path", [("../x.nii.gz", _nii(vol))], {}, 400, "name"),
        ("a name with a folder", [("a/x.nii.gz", _nii(vol))], {}, 400, "name"),
        ("several files that are not one DICOM series", [("a.txt", b"a"), ("b.txt", b"b")], {}, 400, "DICOM"),
        ("not an archive", [("x.tar", b"junk" * 10)], {"uncompress": "true"}, 400, "zip"),
        ("too many members", [("m.tar", _tar([(f"f{i}.dcm", "file", b"x") for i in range(65)]))],
         {"uncompress": "true"}, 413, "ENSAM_MAX_ARCHIVE_MEMBERS"),
        ("a spacing of 40 mm", [("coarse.nii.gz", _nii(vol, np.diag([40.0, 40.0, 40.0, 1.0])))], {}, 400,
         "ENSAM_MAX_SPACING_MM"),
    ]
    for name, files, params, status, word in cases:
        before = _state(srv)
        r = _put_session(srv, files, **params)
        assert r.status_code == status and word in r.json().get("detail", ""), (name, r.status_code, r.text)
        assert _state(srv) == before, name
    _alive(srv)


def test_valid_sessions_still_work(srv):
    img, _, aff = srv.images["vol0"]
    before_tmp = _tree(srv.tmp)
    r = _put_session(srv, [("scan.nii.gz", _nii(img, aff))], expiry="600")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"session_id", "session_info"} and body["session_info"]["name"] == body["session_id"]
    sid = body["session_id"]
    assert os.path.isfile(body["session_info"]["image"])
    assert os.path.realpath(body["session_info"]["image"]).startswith(os.path.realpath(srv.sessions) + os.sep)
    r = requests.get(f"{srv.url}/session/{sid}", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["name"] == sid, r.text
    r = requests.post(f"{srv.url}/infer/ensam", params={"session_id": sid, "output": "json"},
                      data={"params": json.dumps({"foreground": [[14, 12, 8]]})}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    made = [sid]
    series = _dicom_files(3)
    if series:
        for files, params in (([("s.tar.gz", _tar([("series/", "dir", None)] + [(f"series/{n}", "file", d)
                                                                                   for n, d in series], gz=True))],
                               {"uncompress": "true"}),
                              ([("s.zip", _zip([(n, "file", d) for n, d in series]))], {"uncompress": "true"}),
                              (series, {})):
            r = _put_session(srv, files, **params)
            assert r.status_code == 200, (files[0][0], r.text)
            assert os.path.isdir(r.json()["session_info"]["image"])
            made.append(r.json()["session_id"])
            r = requests.get(f"{srv.url}/session/{made[-1]}", params={"image": "true"}, timeout=TIMEOUT)
            assert r.status_code == 409 and "DICOM series" in r.json()["detail"], (r.status_code, r.text[:200])
    for s in made:
        assert requests.delete(f"{srv.url}/session/{s}", timeout=TIMEOUT).status_code == 200
    assert _tree(srv.tmp) == before_tmp  # nothing left in the server's temporary folder


def test_mhd_results_are_refused(srv):
    """``result_extension=".mhd"`` answered the header only and left the voxel file in /tmp (20 MiB a request)."""
    before = _state(srv)
    for ext in (".mhd", "mhd", ".MHD"):
        r = requests.post(f"{srv.url}/infer/ensam", params={"image": "vol0", "output": "image"},
                          data={"params": json.dumps({"foreground": [[14, 12, 8]], "result_extension": ext})},
                          timeout=TIMEOUT)
        assert r.status_code == 400, (ext, r.status_code, r.text[:300])
        assert ".nii.gz" in r.json()["detail"] and ".mha" in r.json()["detail"], r.text
    assert _state(srv) == before


def test_broken_geometry_uploads_are_refused_over_http(srv):
    before = _state(srv)
    for name, data in (("nan_affine.nii.gz", _nii_with_sform((24, 20, 12), BROKEN_AFFINES[0][1])),
                       ("coarse.nii.gz", _nii(np.ones((32, 32, 16), np.float32), np.diag([40.0, 40.0, 40.0, 1.0])))):
        r = requests.put(f"{srv.url}/datastore/image", params={"image": "broken"}, files={"file": (name, data)},
                         timeout=TIMEOUT)
        assert r.status_code == 400, (name, r.status_code, r.text)
        r = requests.post(f"{srv.url}/infer/ensam", params={"output": "json"},
                          data={"params": json.dumps({"foreground": [[5, 5, 5]]})}, files={"file": (name, data)},
                          timeout=TIMEOUT)
        assert r.status_code == 400, (name, r.status_code, r.text)
    assert _state(srv) == before
    _alive(srv)


def test_links_in_the_studies_folder_are_refused(srv):
    """A link ``shadow.nii.gz -> /etc/shadow`` in the studies folder was served by ``GET /datastore/image``, and a
    linked label went into the dataset zip. Links (to outside or inside) are not listed, served, zipped, deleted
    through or written through."""
    r = requests.get(f"{srv.url}/datastore/", params={"output": "all"}, timeout=TIMEOUT)
    assert r.status_code == 200
    objects = r.json()["objects"]
    assert sorted(objects) == ["vol0", "vol1"], sorted(objects)
    assert "final" not in objects["vol1"]["labels"], objects["vol1"]
    for image in ("shadow", "outside", "alias"):
        r = requests.get(f"{srv.url}/datastore/image", params={"image": image}, timeout=TIMEOUT)
        assert r.status_code == 404 and SECRET not in r.content, (image, r.status_code)
        r = requests.post(f"{srv.url}/infer/ensam", params={"image": image, "output": "json"},
                          data={"params": json.dumps({"foreground": [[14, 12, 8]]})}, timeout=TIMEOUT)
        assert r.status_code == 404, (image, r.status_code, r.text)
    r = requests.get(f"{srv.url}/datastore/label", params={"label": "vol1", "tag": "final"}, timeout=TIMEOUT)
    assert r.status_code == 404, r.status_code
    r = requests.get(f"{srv.url}/datastore/dataset", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    with open(os.path.join(srv.secret, "label.nii.gz"), "rb") as f:
        linked_label = f.read()
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        names = sorted(z.namelist())
        assert names == ["image/vol0.nii.gz", "label/vol0.nii.gz", "metadata.json"], names
        assert all(z.read(n) not in (linked_label, SECRET) for n in names)
    secret_before = _tree(srv.secret)
    # an upload under a link's name replaces the link in the studies folder, never the file it pointed to
    img, _, aff = srv.images["vol1"]
    r = requests.put(f"{srv.url}/datastore/image", params={"image": "outside"},
                     files={"file": ("x.nii.gz", _nii(img + 1.0, aff))}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert _tree(srv.secret) == secret_before
    link = os.path.join(srv.studies, "outside.nii.gz")
    assert os.path.isfile(link) and not os.path.islink(link)
    assert requests.delete(f"{srv.url}/datastore/image", params={"id": "outside"}, timeout=TIMEOUT).status_code == 200
    # deleting through a link never reaches the file it points to (the link itself may go)
    r = requests.delete(f"{srv.url}/datastore/image", params={"id": "shadow"}, timeout=TIMEOUT)
    assert r.status_code in (200, 404), r.text
    assert _tree(srv.secret) == secret_before
    with open(srv.log_path, errors="replace") as f:
        log = f.read()
    assert "shadow.nii.gz" in log and "link" in log  # each refused entry is logged
    _alive(srv)
