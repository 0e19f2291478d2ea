"""The OHIF path with real components: a real Orthanc (DICOMweb + GDCM plugins) holding the sample CT series
(sample-datasets/dicom/ct, JPEG 2000), the real ensam server started on it (``--studies <orthanc>/dicom-web``), and
a real headless Chromium driving the OHIF v3 viewer bundled with monailabel.

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
from dataclasses import dataclass

import numpy as np
import pytest
import requests

from conftest import ROOT, Service, _copy_app, free_port, launch, server_cmd, server_env, wait_ready

DICOM_DIR = os.path.join(ROOT, "sample-datasets", "dicom", "ct")
PLUGINS = {
    "orthanc-dicomweb": "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "orthanc-gdcm": "/usr/share/orthanc/plugins/libOrthancGdcm.so",  # the sample series is JPEG 2000
}
CLICK = [160, 260, 10]  # [i, j, k] of the series as the server loads it: the liver, slice 10 of 20
TIMEOUT = 120


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
    s = Service(f"http://127.0.0.1:{port}", launch(server_cmd(app_dir, orthanc.dicomweb, port), log_path, work, env),
                log_path)
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
    transcode such frames (see apps/ensam/main.py, retrieve_series_as_stored). Runs after the click test."""
    import pydicom

    cached = glob.glob(os.path.join(os.path.dirname(server.log_path), "dicomweb-cache", "**", "*.dcm"), recursive=True)
    assert len(cached) >= len(series.files), cached
    stored = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in series.files}
    fetched = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in cached}
    assert fetched == stored, (fetched, stored)


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
              f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    log_path = str(profile) + ".chromedriver.log"
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=log_path), options=opts)
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
