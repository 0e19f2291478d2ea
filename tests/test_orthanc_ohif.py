"""The OHIF path with real components: a real Orthanc (DICOMweb + GDCM plugins) holding the sample CT series
(sample-datasets/dicom/ct, JPEG 2000), the real ensam server started on it (``--studies <orthanc>/dicom-web``), and
a real headless Chromium driving the OHIF v3 viewer bundled with monailabel.

The MONAI Label panel inside OHIF is driven as a user drives it (issue 13): the monai-label mode of the bundled OHIF
opens the study, the panel connects, a liver click and a background click run ``ensam`` (the viewer's segmentation
must equal, voxel for voxel, what the same captured request returns over REST), Auto-Segmentation runs
``ensam_seg``, and the viewer's segmentation is saved as a DICOM SEG in Orthanc. Screenshots of each step go to
``test-artifacts/ohif/`` (``ENSAM_TEST_ARTIFACTS`` to change it), and to ``docs/img/`` with ``ENSAM_DOCS_IMG=1``.

Needs the Debian packages orthanc, orthanc-dicomweb, orthanc-gdcm, chromium, chromium-driver and the pip package
selenium (``make services`` installs the system packages as root). Whatever is missing makes the tests that need it
skip, naming it."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests

from conftest import ROOT, Service, _copy_app, free_port, launch, server_cmd, server_env, wait_ready

DICOM_DIR = os.path.join(ROOT, "sample-datasets", "dicom", "ct")
PLUGINS = {
    "orthanc-dicomweb": "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "orthanc-gdcm": "/usr/share/orthanc/plugins/libOrthancGdcm.so",  # the sample series is JPEG 2000
}
# the app copy lives in a temporary folder: ensam_seg's reference atlases (sample-datasets/train) named explicitly
ATLASES = ("--conf", "atlases", os.path.join(ROOT, "sample-datasets", "train"))
CLICK = [160, 260, 10]  # [i, j, k] of the series as the server loads it: the liver, slice 10 of 20
TIMEOUT = 120
NO_REQUEST_S = 30.0  # a panel "Run" click that sent no request in this time is clicked again (Panel.run)
ARTIFACTS = os.environ.get("ENSAM_TEST_ARTIFACTS") or os.path.join(ROOT, "test-artifacts", "ohif")
DOCS_IMG = os.path.join(ROOT, "docs", "img")


def _which(name: str, *extra: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in extra if os.access(p, os.X_OK)), "")


ORTHANC = _which("Orthanc", "/usr/sbin/Orthanc")
CHROMIUM = _which("chromium", "/usr/bin/chromium")
CHROMEDRIVER = _which("chromedriver", "/usr/bin/chromedriver")


def _missing_orthanc() -> list:
    missing = [] if ORTHANC else ["orthanc (the Orthanc binary)"]
    missing += [pkg for pkg, path in PLUGINS.items() if not os.path.isfile(path)]
    return missing


def _missing_browser() -> list:
    missing = [] if CHROMIUM else ["chromium"]
    missing += [] if CHROMEDRIVER else ["chromium-driver (chromedriver)"]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip, the test extra)")
    return missing


def _skip_if_missing(missing: list, what: str):
    if missing:
        pytest.skip(f"{what} needs {', '.join(missing)}: run `make services` as root (apt-get), "
                    f"and `make venv` for selenium")


# ---------------------------------------------------------------------------------------------------- reference
@dataclass
class Series:
    files: list
    study_uid: str
    series_uid: str
    patient_id: str
    sop_uids: list
    size: tuple  # (i, j, k) as SimpleITK reads the series: the grid the server loads
    origin: tuple
    spacing: tuple
    direction: tuple


@pytest.fixture(scope="module")
def series() -> Series:
    import pydicom
    import SimpleITK as sitk

    files = sorted(glob.glob(os.path.join(DICOM_DIR, "*.dcm")))
    if not files:
        pytest.skip(f"no sample DICOM series in {DICOM_DIR}: run `make data`")
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = {(str(h.StudyInstanceUID), str(h.SeriesInstanceUID)) for h in heads}
    assert len(uids) == 1 and all(all(u) for u in uids), f"the sample files are not one identified series: {uids}"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(DICOM_DIR))
    img = reader.Execute()
    (study, series_uid), = uids
    return Series(files, study, series_uid, str(heads[0].PatientID), sorted(str(h.SOPInstanceUID) for h in heads),
                  img.GetSize(), img.GetOrigin(), img.GetSpacing(), img.GetDirection())


# ---------------------------------------------------------------------------------------------------- Orthanc
@dataclass
class Orthanc(Service):
    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def seg_series(self, study_uid: str) -> list:
        r = requests.get(f"{self.dicomweb}/studies/{study_uid}/series", params={"Modality": "SEG"}, timeout=30)
        assert r.status_code in (200, 204), r.text
        return [s["0020000E"]["Value"][0] for s in (r.json() if r.status_code == 200 and r.content else [])]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, series):
    _skip_if_missing(_missing_orthanc(), "a real Orthanc")
    work = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "ensam-test",
        "HttpPort": port,
        "DicomServerEnabled": False,  # no DICOM listener
        "RemoteAccessAllowed": False,  # Orthanc 1.10 binds every interface: answer loopback only
        "AuthenticationEnabled": False,
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "Plugins": list(PLUGINS.values()),
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (work / "config.json").write_text(json.dumps(config, indent=1))
    log_path = str(work / "orthanc.log")
    o = Orthanc(f"http://127.0.0.1:{port}", launch([ORTHANC, str(work / "config.json")], log_path, str(work)),
                log_path)
    try:
        wait_ready(o, "/system", 60, "Orthanc", every=0.2)
        for f in series.files:
            with open(f, "rb") as fh:
                r = requests.post(f"{o.url}/instances", data=fh.read(), timeout=60)
            assert r.status_code == 200, f"Orthanc refused {f}: {r.status_code} {r.text}"
        yield o
    finally:
        o.stop()


# ---------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(tmp_path_factory, orthanc):
    work = str(tmp_path_factory.mktemp("ensam_dicomweb"))
    app_dir = _copy_app(os.path.join(work, "app"))
    env = server_env(app_dir, MONAI_LABEL_DICOMWEB_CACHE_PATH=os.path.join(work, "dicomweb-cache"))  # not ~/.cache
    log_path = os.path.join(work, "server.log")
    port = free_port()
    s = Service(f"http://127.0.0.1:{port}",
                launch(server_cmd(app_dir, orthanc.dicomweb, port, *ATLASES), log_path, work, env), log_path)
    try:
        wait_ready(s, "/info/", 180, "server")
        yield s
    finally:
        s.stop()


def _ohif_infer(server, image_id, foreground, background=()):
    """The request OHIF v3's MONAI Label panel sends for a deepgrow model (multipart ``params``)."""
    params = {"foreground": [list(v) for v in foreground], "background": [list(v) for v in background],
              "result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
              "restore_label_idx": False}
    return requests.post(f"{server.url}/infer/ensam", params={"image": image_id, "output": "image"},
                         files={"params": (None, json.dumps(params))}, timeout=TIMEOUT)


def _read_image(data: bytes, suffix: str):
    import SimpleITK as sitk

    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(data)
    try:
        return sitk.ReadImage(f.name)
    finally:
        os.remove(f.name)


# ---------------------------------------------------------------------------------------------------- REST
def test_info_and_datastore_list_the_series(server, series):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["models"]["ensam"]["type"] == "deepgrow" and info["models"]["ensam_seg"]["type"] == "segmentation"
    ds = requests.get(f"{server.url}/datastore/", timeout=30).json()
    assert ds["total"] == 1, ds
    # image id = SeriesInstanceUID: what Slicer's "Next Sample" and OHIF use
    r = requests.post(f"{server.url}/activelearning/first", json={}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    sample = r.json()
    assert sample["id"] == series.series_uid, sample
    assert sample["StudyInstanceUID"] == series.study_uid and sample["PatientID"] == series.patient_id


def test_info_fields_3d_slicer_reads(server):
    """What 3D Slicer's MONAI Label module builds its settings from (Slicer itself cannot run here): per model its
    type (the section it lands in), dimension, labels and options; per trainer its options; the strategies and
    scoring methods. Written as a test artefact (``slicer_info_fields.json``; ``docs/img/`` with ENSAM_DOCS_IMG=1)."""
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    fields = {
        "name": info["name"], "version": info["version"],
        "models": {m: {"type": v["type"], "dimension": v["dimension"],
                       "labels": (f"{len(v['labels'])} names: " + ", ".join(list(v["labels"])[:6]) + ", ...")
                       if v["labels"] else [],
                       "config": v.get("config", {})} for m, v in info["models"].items()},
        "trainers": {t: v.get("config", {}) for t, v in info["trainers"].items()},
        "strategies": sorted(info["strategies"]), "scoring": sorted(info["scoring"]),
    }
    assert fields["models"]["ensam"]["type"] == "deepgrow"  # SmartEdit / Deepgrow section: points and ROI
    assert fields["models"]["ensam_seg"]["type"] == "segmentation"  # Auto Segmentation section
    assert "labels" in fields["models"]["ensam_seg"]["config"] and "max_seconds" in fields["trainers"]["ensam"]
    text = json.dumps(fields, indent=1)
    for folder in [ARTIFACTS] + ([DOCS_IMG] if os.environ.get("ENSAM_DOCS_IMG") == "1" else []):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "slicer_info_fields.json"), "w") as f:
            f.write(text + "\n")


def test_ohif_click_gives_nrrd_on_the_series_grid(server, series):
    import SimpleITK as sitk

    r = _ohif_infer(server, series.series_uid, [CLICK])
    assert r.status_code == 200, f"{r.status_code} {r.text[:500]}\n{server.log_tail()}"
    assert r.content[:4] == b"NRRD", r.content[:40]
    seg = _read_image(r.content, ".nrrd")
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert seg.GetSize() == series.size, (seg.GetSize(), series.size)
    assert np.allclose(seg.GetOrigin(), series.origin, atol=1e-3)
    assert np.allclose(seg.GetSpacing(), series.spacing, atol=1e-4)
    assert np.allclose(seg.GetDirection(), series.direction, atol=1e-5)
    mask = sitk.GetArrayFromImage(seg)  # [k, j, i]
    i, j, k = CLICK
    assert set(np.unique(mask)) <= {0, 1}
    assert 0 < mask.sum() < mask.size // 10, f"{int(mask.sum())} voxels"
    # the clicked voxel is in the mask (trained weights or the network's prompt prior): an axis mix-up between the
    # DICOM series, the server's NIfTI conversion, the engine and the NRRD writer would miss it
    assert mask[k, j, i] == 1, f"the clicked voxel {CLICK} is not in the mask ({int(mask.sum())} voxels)"


def test_the_series_is_fetched_in_its_stored_transfer_syntax(server, series):
    """The server asks Orthanc for the series as stored (JPEG 2000 here): Orthanc 1.10 + GDCM crashes when it has to
    transcode such frames (see apps/ensam/lib/monailabel_patches/__init__.py, retrieve_series_as_stored). Runs after
    the click test."""
    import pydicom

    cached = glob.glob(os.path.join(os.path.dirname(server.log_path), "dicomweb-cache", "**", "*.dcm"), recursive=True)
    assert len(cached) >= len(series.files), cached
    stored = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in series.files}
    fetched = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in cached}
    assert fetched == stored, (fetched, stored)


def _raw(url: str, method: str, path: str, body: bytes = b"") -> tuple:
    """(status, body) of a request whose path is sent exactly as given (``curl --path-as-is``: no dot-segment
    removal, no re-encoding), as an attacker would send it."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers={"Content-Type": "application/dicom"} if body else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_the_dicomweb_proxy_reaches_only_dicomweb_reads(server, orthanc, series):
    """Issue 25 (2): monailabel's proxy sent ``/proxy/dicom/wado/../../system`` (and ``/proxy/dicom/patients``, POSTs,
    ...) to the PACS's whole REST API with the server's stored credentials; Orthanc answered 200. Only the viewer's
    DICOMweb reads pass now; everything else is 404/405 and never reaches Orthanc."""
    instances = requests.get(f"{orthanc.url}/instances", timeout=30).json()
    assert instances, "Orthanc holds the series"
    with open(series.files[0], "rb") as f:
        dicom = f.read()
    hostile = [("GET", "/proxy/dicom/wado/../../system"), ("GET", "/proxy/dicom/qido/../../patients"),
               ("GET", "/proxy/dicom/wado/../../statistics"), ("GET", f"/proxy/dicom/wado/../../instances/{instances[0]}/file"),
               ("GET", f"/proxy/dicom/wado/studies/{series.study_uid}/../../../system"),
               ("GET", "/proxy/dicom/wado/%2e%2e/%2e%2e/system"), ("GET", "/proxy/dicom/wado/..%2f..%2fsystem"),
               ("GET", "/proxy/dicom/system"), ("GET", "/proxy/dicom/patients"), ("GET", "/proxy/dicom/stow/studies"),
               ("GET", f"/proxy/dicom/instances/{instances[0]}/file"), ("GET", "/proxy/dicom/wado/tools/now"),
               ("POST", "/proxy/dicom/instances"), ("POST", "/proxy/dicom/stow/studies"),
               ("POST", "/proxy/dicom/wado/../../instances"), ("DELETE", f"/proxy/dicom/wado/../../instances/{instances[0]}")]
    answers = {}
    for method, path in hostile:
        status, body = _raw(server.url, method, path, dicom if method == "POST" else b"")
        answers[f"{method} {path}"] = status
        assert status in (404, 405), (method, path, status, body[:300])
        assert b"ApiVersion" not in body and b"DicomAet" not in body and b"CountInstances" not in body, (path, body)
    print("\nDICOMweb proxy, hostile paths:", answers)
    assert sorted(requests.get(f"{orthanc.url}/instances", timeout=30).json()) == sorted(instances)
    # the viewer's reads still pass, Accept and query string included
    r = requests.get(f"{server.url}/proxy/dicom/qido/studies", params={"StudyInstanceUID": series.study_uid},
                     headers={"Accept": "application/dicom+json"}, timeout=60)
    assert r.status_code == 200 and series.study_uid in r.text, (r.status_code, r.text[:300])
    r = requests.get(f"{server.url}/proxy/dicom/wado/studies/{series.study_uid}/series/{series.series_uid}/metadata",
                     timeout=60)
    assert r.status_code == 200 and series.sop_uids[0] in r.text, (r.status_code, r.text[:300])


def test_saving_a_label_stores_a_dicom_seg_in_orthanc(server, orthanc, series):
    """PUT /datastore/label as Slicer sends it (a NIfTI + label_info) and as OHIF's client sends it (raw voxels,
    ``label.bin``): each becomes a DICOM SEG in Orthanc that decodes back to the same voxels."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    r = _ohif_infer(server, series.series_uid, [CLICK])
    assert r.status_code == 200, r.text[:500]
    label = _read_image(r.content, ".nrrd")
    sent = sitk.GetArrayFromImage(label)
    assert sent.sum() > 0
    with tempfile.TemporaryDirectory() as tmp:
        nii = os.path.join(tmp, "label.nii.gz")
        sitk.WriteImage(label, nii)
        with open(nii, "rb") as f:
            slicer_upload = ("label.nii.gz", f.read())
    ohif_upload = ("label.bin", np.ascontiguousarray(sent.astype(np.uint8)).tobytes())  # i fastest = Fortran order
    params = {"label_info": [{"name": "liver", "idx": 1}]}

    for name, upload in (("Slicer", slicer_upload), ("OHIF", ohif_upload)):
        before = set(orthanc.seg_series(series.study_uid))
        r = requests.put(f"{server.url}/datastore/label", params={"image": series.series_uid, "tag": "final"},
                         files={"label": upload, "params": (None, json.dumps(params))}, timeout=TIMEOUT)
        assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:500]}\n{server.log_tail()}"
        assert r.json()["image"] == series.series_uid
        new = set(orthanc.seg_series(series.study_uid)) - before
        assert len(new) == 1, f"{name}: no new SEG series in Orthanc ({new})"
        seg_uid = new.pop()

        # the SEG as Orthanc stores it: references the CT series and holds the voxels that were sent
        found = requests.post(f"{orthanc.url}/tools/find", json={"Level": "Instance", "Query": {
            "SeriesInstanceUID": seg_uid}}, timeout=30).json()
        assert len(found) == 1, found
        dcm = pydicom.dcmread(io.BytesIO(requests.get(f"{orthanc.url}/instances/{found[0]}/file", timeout=30).content))
        assert dcm.Modality == "SEG" and dcm.StudyInstanceUID == series.study_uid
        assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
        assert dcm.SegmentSequence[0].SegmentLabel == "liver"
        back = pydicom_seg.MultiClassReader().read(dcm).image
        assert back.GetSize() == series.size and np.allclose(back.GetOrigin(), series.origin, atol=1e-3)
        assert np.array_equal(sitk.GetArrayFromImage(back), sent), f"{name}: the stored SEG differs from the label"

        # the image counts as labelled at once (monailabel counts one per SEG series referencing it)
        ds = requests.get(f"{server.url}/datastore/", timeout=30).json()
        assert ds["completed"] == len(orthanc.seg_series(series.study_uid)) and ds["label_tags"]["final"] == 1, ds
        obj = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        assert obj[series.series_uid]["labels"]["final"]["info"]["SeriesInstanceUID"] == seg_uid


def test_dicom_seg_inference_output(server, series):
    """``output=dicom_seg`` without dcmqi: the same click as NIfTI and as DICOM SEG; the SEG decodes back to the same
    voxels on the series' grid, references the series and names its segment after the request's label."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    url = f"{server.url}/infer/ensam"
    params = {"foreground": [list(CLICK)], "label": "liver", "reset_state": True}  # the same step twice
    r = requests.post(url, params={"image": series.series_uid, "output": "image"},
                      files={"params": (None, json.dumps(params))}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:500]
    nifti = sitk.GetArrayFromImage(_read_image(r.content, ".nii.gz"))
    t0 = time.time()
    r = requests.post(url, params={"image": series.series_uid, "output": "dicom_seg"},
                      files={"params": (None, json.dumps(params))}, timeout=TIMEOUT)
    took = time.time() - t0
    assert r.status_code == 200, f"{r.status_code} {r.text[:500]}\n{server.log_tail()}"
    assert r.headers["content-type"] == "application/dicom", r.headers
    dcm = pydicom.dcmread(io.BytesIO(r.content))
    assert dcm.Modality == "SEG" and dcm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4", (dcm.Modality, dcm.SOPClassUID)
    assert dcm.StudyInstanceUID == series.study_uid and dcm.SeriesInstanceUID != series.series_uid
    assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    refs = {str(i.ReferencedSOPInstanceUID) for i in dcm.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(series.sop_uids), "the SEG must reference the series' instances"
    assert [s.SegmentLabel for s in dcm.SegmentSequence] == ["liver"]
    assert dcm.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "91723000"
    back = pydicom_seg.MultiClassReader().read(dcm).image
    assert back.GetSize() == series.size
    assert np.allclose(back.GetOrigin(), series.origin, atol=1e-3)
    assert np.allclose(back.GetSpacing(), series.spacing, atol=1e-4)
    assert np.allclose(back.GetDirection(), series.direction, atol=1e-5)
    decoded = sitk.GetArrayFromImage(back)
    assert nifti.sum() > 0 and np.array_equal(decoded, nifti), "the SEG's voxels differ from the NIfTI result"
    print(f"\noutput=dicom_seg: {int(nifti.sum())} voxels, {dcm.NumberOfFrames} frames, {took:.2f} s")

    # OHIF's request form (no label): the segment takes the model's name; label_info names it explicitly
    p = {"foreground": [list(CLICK)], "label_info": [{"name": "hepar", "idx": 1, "color": [10, 20, 30]}]}
    r = requests.post(url, params={"image": series.series_uid, "output": "dicom_seg"},
                      files={"params": (None, json.dumps(p))}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:500]
    seg = pydicom.dcmread(io.BytesIO(r.content)).SegmentSequence[0]
    assert seg.SegmentLabel == "hepar" and list(seg.RecommendedDisplayCIELabValue), seg
    r = requests.post(url, params={"image": series.series_uid, "output": "dicom_seg"},
                      files={"params": (None, json.dumps({"foreground": [list(CLICK)], "label_info": "liver"}))},
                      timeout=TIMEOUT)
    assert r.status_code == 400 and "label_info" in r.json()["detail"], r.text


def test_an_empty_label_is_refused_with_a_reason(server, orthanc, series):
    before = orthanc.seg_series(series.study_uid)
    empty = np.zeros(series.size[::-1], dtype=np.uint8).tobytes()
    r = requests.put(f"{server.url}/datastore/label", params={"image": series.series_uid, "tag": "final"},
                     files={"label": ("label.bin", empty),
                            "params": (None, json.dumps({"label_info": [{"name": "liver", "idx": 1}]}))},
                     timeout=TIMEOUT)
    assert r.status_code == 400 and "empty" in r.json()["detail"], r.text
    assert orthanc.seg_series(series.study_uid) == before
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


# ---------------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _skip_if_missing(_missing_browser(), "the OHIF browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
              f"--user-data-dir={profile}", "--window-size=1600,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    log_path = str(profile) + ".chromedriver.log"
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=log_path), options=opts)
    except Exception as e:  # noqa: BLE001 - installed but cannot start here (no display libs, sandbox, ...)
        try:
            with open(log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-5:])
        except OSError:
            tail = ""
        pytest.skip(f"headless Chromium ({CHROMIUM}) does not start here: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''} {tail}".strip())
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and the browser it started


def _network(driver, into: dict):
    """Collect (url -> HTTP status) of the page's responses from Chromium's performance log (which drains it)."""
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.responseReceived":
            resp = msg["params"]["response"]
            into[resp["url"]] = resp["status"]
    return into


def _wait(what: str, cond, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_ohif_study_list_shows_the_study(server, orthanc, series, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/ohif/")
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    _wait(f"the study list to show patient {series.patient_id}", lambda: series.patient_id in body(), 60)
    text = body()
    assert "Study List" in text and "CT" in text, text[:800]
    seen = _network(browser, {})
    qido = {u: s for u, s in seen.items() if "/proxy/dicom/qido/studies" in u}
    assert qido and all(s == 200 for s in qido.values()), qido


def test_ohif_viewer_renders_the_series(server, orthanc, series, browser):
    from PIL import Image
    from selenium.webdriver.common.by import By

    seen: dict = {}
    _network(browser, seen)  # drop what is left of the previous page
    seen.clear()
    browser.get(f"{server.url}/ohif/viewer?StudyInstanceUIDs={series.study_uid}")

    def frames_loaded():
        _network(browser, seen)
        ok = {sop for sop in series.sop_uids
              if any(f"/instances/{sop}/frames/" in u and s == 200 for u, s in seen.items())}
        return len(ok) == len(series.sop_uids)

    _wait(f"the {len(series.sop_uids)} frames of the series through /proxy/dicom", frames_loaded, 120)
    proxied = {u: s for u, s in seen.items() if "/proxy/dicom/" in u}
    assert all(s == 200 for s in proxied.values()), {u: s for u, s in proxied.items() if s != 200}
    assert any(u.endswith(f"/studies/{series.study_uid}/metadata") for u in proxied), list(proxied)[:5]
    assert orthanc.alive(), f"Orthanc died while the viewer loaded the series:\n{orthanc.log_tail()}"

    canvas = _wait("a cornerstone canvas", lambda: browser.find_elements(By.CSS_SELECTOR, "canvas.cornerstone-canvas"),
                   60)[0]
    assert canvas.size["width"] > 100 and canvas.size["height"] > 100, canvas.size

    def rendered():
        img = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("L"), dtype=np.float32)
        # a CT slice: a body with many grey levels on black; an empty or failed viewport is flat
        stats = {"size": img.shape[::-1], "std": round(float(img.std()), 1), "levels": len(np.unique(img)),
                 "bright": round(float((img > 60).mean()), 3)}
        return stats if stats["std"] > 20 and stats["levels"] > 64 and stats["bright"] > 0.05 else None

    stats = _wait("the CT slice to be drawn on the canvas", rendered, 60, every=1.0)
    print(f"\nOHIF viewer: {len(proxied)} proxied DICOMweb requests, all 200; canvas {stats}")


# ---------------------------------------------------------------------------------------------------- the panel
# OHIF's MONAI Label panel (monailabel 0.8.5's bundle: OHIF 3.9, route /ohif/monai-label) driven with real clicks.
# Two things are read from the page rather than from pixels: the viewer's segmentation (the labelmap the panel
# writes into, through OHIF's segmentationService) and the panel's own client object, to save the label (the
# bundled panel has no control that saves: MonaiLabelClient.save_label is defined but nothing calls it).
LIVER = (160, 260)  # [i, j] on the axial slice OHIF shows first: the liver
SPINE = (256, 330)  # [i, j]: a vertebral body, outside the liver (the background click)
CLICK_TARGET_S = 2.0  # issue 13: a click in the panel returns its mask in under 2 s on the sample CT
PANEL_TARGET_S = 180.0  # and the panel tests take under 3 minutes

# The panel component, found from its DOM node through React's fiber; timing hooks on "Run" clicks and on OHIF's
# segmentation-data-modified event (the panel fires it once it has written a result into the labelmap).
JS_HOOK = """
const el = document.querySelector('.monaiLabelPanel');
if (!el) return 'no .monaiLabelPanel in the page';
const key = Object.keys(el).find(k => k.startsWith('__reactFiber'));
let f = key ? el[key] : null;
while (f && !(f.stateNode && f.stateNode.updateView && f.stateNode.client)) f = f.return;
if (!f) return 'the MonaiLabelPanel component was not found';
const panel = f.stateNode;
const seg = panel.props.servicesManager.services.segmentationService;
window.__ensam = {panel, runs: [], modified: []};
performance.setResourceTimingBufferSize(100000);  // the default 250 entries fill up with the series' frames
seg.subscribe(seg.EVENTS.SEGMENTATION_DATA_MODIFIED, () => window.__ensam.modified.push(performance.now()));
document.addEventListener('click', e => {
  const b = e.target.closest && e.target.closest('button[title^="Run "]');
  if (b) window.__ensam.runs.push(performance.now());
}, true);
return '';
"""
JS_LABELMAP = """
const seg = window.__ensam.panel.props.servicesManager.services.segmentationService;
const vol = seg.getLabelmapVolume('1');
if (!vol) return null;
const a = vol.voxelManager.getCompleteScalarDataArray();
const runs = [];
for (let i = 0; i < a.length;) {
  if (a[i] === 0) { i++; continue; }
  let j = i + 1;
  while (j < a.length && a[j] === a[i]) j++;
  runs.push(i, j - i, a[i]);
  i = j;
}
const s = seg.getSegmentation('1');
const segments = (s.config && s.config.segments) || s.segments || {};
const names = {};
for (const k of Object.keys(segments)) names[segments[k].label] = Number(segments[k].segmentIndex || k);
return {n: a.length, dims: Array.from(vol.dimensions), runs, names};
"""
JS_CANVAS_XY = """
const p = window.__ensam.panel, s = p.props.servicesManager.services;
const {viewport} = p.getActiveViewportInfo();
const vp = s.cornerstoneViewportService.getCornerstoneViewport(viewport.viewportId);
const data = s.cornerstoneViewportService.getViewportInfo(viewport.viewportId).viewportData.data[0].volume.imageData;
const k = Math.round(data.worldToIndex(vp.getCamera().focalPoint)[2]);
const c = vp.worldToCanvas(data.indexToWorld([arguments[0], arguments[1], k]));
const r = vp.canvas.getBoundingClientRect();
return [r.left + c[0], r.top + c[1], k, viewport.viewportId];
"""
JS_PROBES = """
const p = window.__ensam.panel, s = p.props.servicesManager.services;
const {viewport} = p.getActiveViewportInfo();
const group = s.toolGroupService.getToolGroupForViewport(viewport.viewportId);
const points = window.cornerstoneTools.annotation.state.getAllAnnotations()
  .filter(a => a.metadata && a.metadata.toolName === 'ProbeMONAILabel').length;
return [group ? group.getActivePrimaryMouseButtonTool() : null, points];
"""
JS_SAVE = """
const done = arguments[arguments.length - 1];
const p = window.__ensam.panel, s = p.props.servicesManager.services;
const {displaySet} = p.getActiveViewportInfo();
const a = s.segmentationService.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray();
const voxels = new Uint8Array(a.length);
voxels.set(a);
const label_info = arguments[0];
p.client().save_label(displaySet.SeriesInstanceUID, new Blob([voxels]), {label_info})
  .then(r => done({status: r.status, data: r.data || (r.response && r.response.data) || String(r)}),
        e => done({status: -1, data: String(e)}));
"""


class OtherLoad:
    """CPU time used by processes outside this test session (its own tree: pytest, the servers, the browser)
    between ``start()`` and ``cpus()``, in CPUs: timing targets are only checked on a machine not shared with
    others (another job on the same cores slows every step of ours)."""

    def __init__(self):
        self.t0, self.base = 0.0, {}

    @staticmethod
    def _others() -> dict:
        import psutil

        me = psutil.Process()
        ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
        out = {}
        for proc in psutil.process_iter():
            if proc.pid in ours:
                continue
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def start(self) -> "OtherLoad":
        self.t0, self.base = time.time(), self._others()
        return self

    def cpus(self) -> float:
        now, elapsed = self._others(), max(time.time() - self.t0, 1e-3)
        return sum(max(t - self.base.get(pid, t), 0.0) for pid, t in now.items()) / elapsed


def _busy(load: float) -> bool:
    return load > 0.25  # a quarter of a core used by others: the figures are printed, not held to the targets


def _shot(driver, name: str) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, f"{name}.png")
    driver.save_screenshot(path)
    if os.environ.get("ENSAM_DOCS_IMG") == "1":  # the README's pictures, made by this run
        os.makedirs(DOCS_IMG, exist_ok=True)
        shutil.copyfile(path, os.path.join(DOCS_IMG, f"ohif_{name}.png"))
    return path


def _retry(what: str, action, timeout: float = 15.0):
    """Run a UI action until it works: React re-renders the panel's nodes under Selenium's feet."""
    from selenium.common.exceptions import WebDriverException

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            return action()
        except (WebDriverException, AssertionError) as e:
            last = e
            time.sleep(0.3)
    raise AssertionError(f"{what}: {type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}")


def _posted(driver, marker: str, entries: list | None = None) -> list:
    """[(url, request id, body)] of the page's POSTs whose URL holds ``marker``, from Chromium's performance log
    (drains it; with ``entries``, the drained entries are appended there and all of them are read, so that a log
    read before is not lost); the body from the log entry or, when Chromium left it out, from the DevTools
    protocol."""
    out = []
    entries = [] if entries is None else entries
    entries.extend(driver.get_log("performance"))
    for entry in entries:
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") != "Network.requestWillBeSent":
            continue
        req = msg["params"]["request"]
        if req.get("method") != "POST" or marker not in req["url"]:
            continue
        body = req.get("postData")
        if body is None and req.get("hasPostData"):
            body = driver.execute_cdp_cmd("Network.getRequestPostData",
                                          {"requestId": msg["params"]["requestId"]})["postData"]
        out.append((req["url"], msg["params"]["requestId"], body or ""))
    return out


def _form_params(body: str) -> dict:
    """The ``params`` field of a multipart/form-data body as the panel sends it (a JSON object)."""
    for part in body.split("\r\n--"):
        head, _, value = part.partition("\r\n\r\n")
        if 'name="params"' in head:
            return json.loads(value.strip().rstrip("-").strip())
    raise AssertionError(f"no params field in the request body: {body[:300]!r}")


def _nrrd_array(data: bytes) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(_read_image(data, ".nrrd"))  # [k, j, i]: i fastest, as the viewer's labelmap


@dataclass
class Panel:
    driver: object
    server: Service
    series: Series
    load: OtherLoad
    steps: dict
    perf: list = field(default_factory=list)  # performance-log entries read since the last run()

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def labelmap(self):
        """(the viewer's segmentation as an array [k, j, i], {segment name: segment index})."""
        got = self.js(JS_LABELMAP)
        assert got, "the viewer has no segmentation (the panel creates it when it connects)"
        flat = np.zeros(got["n"], dtype=np.uint8)
        runs = np.asarray(got["runs"], dtype=np.int64).reshape(-1, 3)
        for start, length, value in runs:
            flat[start:start + length] = value
        return flat.reshape(got["dims"][::-1]), got["names"]

    def tab(self, title: str):
        from selenium.webdriver.common.by import By

        xpath = f"//label[contains(@class,'tab-label') and normalize-space()='{title}']"
        _retry(f"open the {title!r} tab", lambda: self.driver.find_element(By.XPATH, xpath).click())

    def organ(self, name: str):
        from selenium.webdriver.common.by import By

        xpath = f"//tr[contains(@class,'clickable-row')]/td[normalize-space()='{name}']"
        _retry(f"pick {name!r} in the panel's organ list", lambda: self.driver.find_element(By.XPATH, xpath).click())
        time.sleep(0.3)

    def click_voxel(self, ij) -> list:
        """A left click on the axial viewport at voxel [i, j] of the slice it shows; returns that voxel [i, j, k]."""
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        _wait("the panel's click tool (ProbeMONAILabel) on the viewport's left button",
              lambda: self.js(JS_PROBES)[0] == "ProbeMONAILabel", 10, every=0.2)
        for _ in range(3):  # a click that lands while the viewport re-renders places no point: click again
            before = self.js(JS_PROBES)[1]
            x, y, k, viewport = self.js(JS_CANVAS_XY, *ij)
            assert viewport == "mpr-axial", viewport
            actions = ActionBuilder(self.driver)
            actions.pointer_action.move_to_location(int(round(x)), int(round(y)))
            actions.pointer_action.click()
            actions.perform()
            try:
                _wait("the click's point", lambda: self.js(JS_PROBES)[1] > before, 3, every=0.1)
                return [ij[0], ij[1], k]
            except AssertionError:
                continue
        raise AssertionError(f"no point placed by clicking voxel {ij} (tool and points: {self.js(JS_PROBES)})")

    def posted(self, marker: str) -> list:
        """The page's POSTs whose URL holds ``marker`` since the last :meth:`run` started (see :func:`_posted`)."""
        return _posted(self.driver, marker, self.perf)

    def run(self, title: str, timeout: float) -> dict:
        """Click the panel's "Run" button ``title``; wait until the panel has written the result into the viewer.
        Returns the timing measured in the page: click -> HTTP response -> segmentation modified.

        A click that sends no request within ``NO_REQUEST_S`` (seen under load: the panel re-rendering as the
        click lands) is repeated, at most twice, as a user would; each is counted in ``clicks``, and a request that
        was sent is only waited for, never sent twice."""
        from selenium.webdriver.common.by import By

        before = self.js("performance.clearResourceTimings(); return window.__ensam.modified.length")
        self.driver.get_log("performance")  # drop older entries: the request below is the one to capture
        self.perf = []
        load = OtherLoad().start()

        def click():
            button = self.driver.find_element(By.CSS_SELECTOR, f"button[title='{title}']")
            assert button.is_displayed() and button.is_enabled(), f"{title!r} is not enabled yet"
            button.click()

        _retry(f"click {title!r}", click)
        clicks, clicked_at, deadline = 1, time.time(), time.time() + timeout
        while self.js("return window.__ensam.modified.length") <= before:
            if time.time() > deadline:
                shot = _shot(self.driver, f"failed_{title.replace(' ', '_')}")
                sent = [(u, b[-400:]) for u, _, b in self.posted("/")]
                console = [m["message"][:300] for m in self.driver.get_log("browser")][-15:]
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for the result of {title!r} in the "
                                     f"viewer ({clicks} clicks); screenshot {shot}; the page's POSTs: {sent}; "
                                     f"console: {console}")
            if clicks < 3 and time.time() - clicked_at > NO_REQUEST_S and not self.posted("/infer/"):
                console = [m["message"][:200] for m in self.driver.get_log("browser")][-5:]
                print(f"\n{title!r}: no request {NO_REQUEST_S:.0f} s after click {clicks} (console: {console}); "
                      f"clicking again")
                _retry(f"click {title!r} again", click)
                clicks, clicked_at = clicks + 1, time.time()
            time.sleep(0.1)
        clicked, modified, http = self.js("""
            const e = window.__ensam, infer = performance.getEntriesByType('resource')
              .filter(r => r.name.includes('/infer/')).pop();
            return [e.runs[e.runs.length - 1], e.modified[e.modified.length - 1],
                    infer ? [infer.startTime, infer.responseEnd] : null];""")
        return {"click_to_mask_s": (modified - clicked) / 1000.0, "clicks": clicks,
                "http_s": (http[1] - http[0]) / 1000.0 if http else None, "others_cpus": load.cpus()}


@pytest.fixture(scope="module")
def panel(server, orthanc, series, browser):
    """The study open in OHIF's monai-label mode, the MONAI Label panel connected to ensam's server."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # the server's first request on a series fetches it from Orthanc and builds the model (once per server life):
    # done here over REST, away from the liver, so that the panel's clicks are timed as a user's usual clicks
    t0 = time.time()
    r = _ohif_infer(server, series.series_uid, [[350, 250, 9]])
    assert r.status_code == 200, r.text[:300]
    warm_up = time.time() - t0
    load = OtherLoad().start()
    t0 = time.time()
    browser.get(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={series.study_uid}")
    _wait("the MONAI Label panel", lambda: browser.find_elements(By.ID, "monailabelServerURL"), 90)
    seen: dict = {}

    def frames_loaded():
        _network(browser, seen)
        return all(any(f"/instances/{sop}/frames/" in u and s == 200 for u, s in seen.items())
                   for sop in series.sop_uids)

    _wait("the series' frames", frames_loaded, 120)
    for b in browser.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
        b.click()  # OHIF's "investigational use" banner covers the bottom of the viewports

    def connect():  # the panel's Server field (it defaults to port 8000) and its connect button
        url_box = browser.find_element(By.ID, "monailabelServerURL")
        url_box.send_keys(Keys.CONTROL + "a")
        url_box.send_keys(Keys.BACKSPACE)
        url_box.send_keys(f"{server.url}/")
        assert url_box.get_attribute("value") == f"{server.url}/"
        browser.find_element(By.CSS_SELECTOR, ".monaiLabelPanel .settingsTable button").click()

    _retry("connect the panel to the server", connect)
    _wait("the panel's tabs after connecting",
          lambda: browser.find_elements(By.XPATH, "//label[normalize-space()='Point Prompts']"), 30)
    problem = browser.execute_script(JS_HOOK)
    assert not problem, problem
    _wait("the panel's segmentation in the viewer",
          lambda: browser.execute_script("return !!window.__ensam.panel.props.servicesManager.services"
                                         ".segmentationService.getLabelmapVolume('1')"), 30)
    time.sleep(1.5)  # the panel sets its segment colours 1 s after creating the segmentation
    _shot(browser, "1_connected")
    p = Panel(browser, server, series, load, {"open_and_connect_s": time.time() - t0, "server_warm_up_s": warm_up})
    yield p
    total = sum(v for k, v in p.steps.items() if k.endswith("_s"))
    others = load.cpus()
    print(f"\nOHIF MONAI Label panel: {json.dumps({k: round(v, 2) for k, v in p.steps.items()})}; "
          f"total {total:.1f} s; others' CPU load {others:.2f}")
    if not _busy(others):
        assert total < PANEL_TARGET_S, f"the panel tests took {total:.0f} s (target {PANEL_TARGET_S:.0f} s)"


def _replay(panel: Panel, url: str, params: dict) -> np.ndarray:
    """The panel's request sent again over REST, as the same multipart form: its NRRD as an array [k, j, i]."""
    r = requests.post(url, files={"params": (None, json.dumps(params))}, timeout=TIMEOUT)
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]}"
    return _nrrd_array(r.content)


def test_panel_point_prompts_match_rest(panel, series):
    """Point Prompts with model ensam: a foreground click on the liver, Run; then a background click on the spine,
    the liver picked again, Run (the bundled panel sends the clicks of the organ picked when Run is pressed as
    foreground and those of "background" as background). Each time the viewer's segmentation must equal the mask
    the same request returns over REST, and the click must come back in under 2 s."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    t0 = time.time()
    panel.tab("Point Prompts")
    select = panel.driver.find_element(By.XPATH, "//label[normalize-space()='Point Prompts']/following-sibling::div"
                                                 "//select[contains(@class,'selectBox')]")
    assert [o.get_attribute("value") for o in Select(select).options] == ["ensam"]
    Select(select).select_by_value("ensam")
    panel.organ("liver")
    fg = panel.click_voxel(LIVER)
    timings = []

    for step, (bg, shot) in enumerate(((None, "2_liver_click"), (SPINE, "3_background_click"))):
        if bg:
            panel.organ("background")
            bg = panel.click_voxel(bg)
            panel.organ("liver")
        timing = panel.run("Run PointPrompts", 60)
        timings.append(timing)
        _shot(panel.driver, shot)
        (url, _, body), = panel.posted("/infer/ensam?")
        sent = _form_params(body)
        assert f"image={series.series_uid}" in url and "output=image" in url, url
        assert sent["result_extension"] == ".nrrd" and sent["result_dtype"] == "uint8", sent
        (sent_fg,) = sent["foreground"]
        assert np.abs(np.subtract(sent_fg, fg)).max() <= 1, (sent_fg, fg)  # the click, rounded by OHIF
        if bg:
            (sent_bg,) = sent["background"]
            assert np.abs(np.subtract(sent_bg, bg)).max() <= 1, (sent_bg, bg)
        else:
            assert sent["background"] == [], sent

        viewer, names = panel.labelmap()
        rest = _replay(panel, url, sent)
        assert viewer.shape == rest.shape == tuple(series.size[::-1]), (viewer.shape, rest.shape)
        assert set(np.unique(rest)) <= {0, 1} and rest.sum() > 0, np.unique(rest)
        liver = names["liver"]
        assert set(np.unique(viewer)) <= {0, liver}, np.unique(viewer)
        i, j, k = sent_fg
        assert viewer[k, j, i] == liver, "the clicked voxel is not in the viewer's segmentation"
        assert np.array_equal(viewer == liver, rest == 1), (
            f"the viewer's segmentation differs from the REST answer to the same request in "
            f"{int(((viewer == liver) != (rest == 1)).sum())} voxels")
        print(f"\npanel click {step + 1} ({'fg + bg' if bg else 'fg'}): {int(rest.sum())} voxels, "
              f"click -> mask {timing['click_to_mask_s']:.2f} s (HTTP {timing['http_s']:.2f} s), "
              f"others' CPU {timing['others_cpus']:.2f}")

    panel.steps["point_prompts_s"] = time.time() - t0
    worst = max(t["click_to_mask_s"] for t in timings)
    if any(_busy(t["others_cpus"]) for t in timings):
        print(f"click -> mask target ({CLICK_TARGET_S} s) not checked: other processes used the CPUs "
              f"({[round(t['others_cpus'], 2) for t in timings]} CPUs); worst {worst:.2f} s")
    else:
        assert worst < CLICK_TARGET_S, f"a click in the panel took {worst:.2f} s (target {CLICK_TARGET_S} s)"


def test_panel_auto_segmentation(panel, series):
    """Options / Configurations -> infer -> ensam_seg -> labels = liver (what the run segments; the default is 9
    organs), then Auto-Segmentation -> Run. The viewer shows exactly the answer the browser received, its values
    mapped to the panel's segments by the names /info gives."""
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    t0 = time.time()
    _retry("open Options / Configurations", lambda: panel.driver.find_element(
        By.XPATH, "//a[normalize-space()='Options / Configurations']").click())
    _retry("pick infer / ensam_seg", lambda: Select(panel.driver.find_element(
        By.CSS_SELECTOR, "select[name='selectName']")).select_by_value("ensam_seg"))

    def type_labels():
        field = panel.driver.find_element(By.ID, "inferensam_seglabels")
        field.send_keys(Keys.CONTROL + "a")
        field.send_keys(Keys.BACKSPACE)
        field.send_keys("liver")
        assert panel.driver.find_element(By.ID, "inferensam_seglabels").get_attribute("value") == "liver"

    _retry("type the labels option", type_labels)
    _shot(panel.driver, "4_options")
    _retry("confirm the options", lambda: panel.driver.find_element(By.XPATH, "//button[normalize-space()='Confirm']")
           .click())
    panel.tab("Auto-Segmentation")
    timing = panel.run("Run Segmentation", 240)
    _shot(panel.driver, "5_auto_segmentation")
    (url, request_id, body), = panel.posted("/infer/ensam_seg?")
    sent = _form_params(body)
    assert sent["labels"] == "liver" and f"image={series.series_uid}" in url, (url, sent)
    try:  # the NRRD the browser received; replayed over REST if Chromium no longer holds it
        got = panel.driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": request_id})
        answer = _nrrd_array(base64.b64decode(got["body"]) if got["base64Encoded"] else got["body"].encode("latin-1"))
    except Exception:  # noqa: BLE001
        answer = _replay(panel, url, sent)
    liver_value = requests.get(f"{panel.server.url}/info/", timeout=30).json()["models"]["ensam_seg"]["labels"]["liver"]
    viewer, names = panel.labelmap()
    assert set(np.unique(answer)) <= {0, liver_value}, np.unique(answer)
    assert set(np.unique(viewer)) <= {0, names["liver"]}, np.unique(viewer)
    assert np.array_equal(viewer == names["liver"], answer == liver_value), "the viewer differs from the answer"
    panel.steps["auto_segmentation_s"] = time.time() - t0
    print(f"\npanel auto segmentation (ensam_seg, liver): {int((answer > 0).sum())} voxels, "
          f"{timing['click_to_mask_s']:.1f} s ({timing['clicks']} click(s) on Run), "
          f"others' CPU {timing['others_cpus']:.2f}")


def test_panel_saves_the_segmentation_as_dicom_seg_in_orthanc(panel, orthanc, series):
    """The viewer's segmentation saved through the panel's client (``save_label``: raw voxels as label.bin, the
    request OHIF's client makes; the bundled panel has no button that calls it) becomes a DICOM SEG in Orthanc
    holding the same voxels, its segment named after the panel's segment."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    t0 = time.time()
    viewer, names = panel.labelmap()
    present = sorted(int(v) for v in np.unique(viewer) if v)
    assert present, "nothing to save: the viewer's segmentation is empty"
    by_index = {idx: name for name, idx in names.items()}
    label_info = [{"name": by_index[v], "idx": v} for v in present]
    before = set(orthanc.seg_series(series.study_uid))
    res = panel.driver.execute_async_script(JS_SAVE, label_info)
    assert res["status"] == 200, res
    new = set(orthanc.seg_series(series.study_uid)) - before
    assert len(new) == 1, f"no new SEG series in Orthanc ({new})"
    seg_uid = new.pop()
    found = requests.post(f"{orthanc.url}/tools/find", json={"Level": "Instance", "Query": {
        "SeriesInstanceUID": seg_uid}}, timeout=30).json()
    dcm = pydicom.dcmread(io.BytesIO(requests.get(f"{orthanc.url}/instances/{found[0]}/file", timeout=30).content))
    assert dcm.Modality == "SEG" and dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert sorted((int(s.SegmentNumber), str(s.SegmentLabel)) for s in dcm.SegmentSequence) == \
        [(e["idx"], e["name"]) for e in label_info]
    back = sitk.GetArrayFromImage(pydicom_seg.MultiClassReader().read(dcm).image)
    assert np.array_equal(back, viewer), "the SEG in Orthanc differs from the viewer's segmentation"
    time.sleep(1.0)
    _shot(panel.driver, "6_saved")
    panel.steps["save_s"] = time.time() - t0
    print(f"\npanel save: SEG {seg_uid} in Orthanc, segments {label_info}")
