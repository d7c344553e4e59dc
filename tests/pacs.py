"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, and synthetic studies to load into it.

``orthanc()`` starts ``Orthanc`` on a free loopback port with a temporary storage directory (optionally behind a
Lua filter that admits one bearer token) and stops it afterwards. The data is made here with pydicom, tifffile and
Debian's ``OrthancWSIDicomizer``, nothing is downloaded, and it is uploaded through Orthanc's REST API:

* a CT series of 120 instances uploaded in shuffled order: 110 slices of acquisition 1 (109 positions, one
  instance number repeated), 9 of acquisition 2 and one DERIVED reformat;
* a sagittal MR series of 24 slices whose brightness grows from slice to slice;
* a single radiograph, a structured report (no pixels) and a DICOM whole-slide image of 4 levels;
* an Aperio-style SVS file of the same slide, for upload.

Used by ``tests/e2e/test_dicomweb_e2e.py``, the playground's browser test and ``bench/dicomweb_memory.py``.
Every patient attribute is fake, and there so the tests can assert it never leaks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
DICOMIZER = shutil.which("OrthancWSIDicomizer") or "/usr/bin/OrthancWSIDicomizer"
PATIENT_NAME = "Pacs^Zebedee"  # fake, and distinctive: tests assert it never reaches a response or a log
PATIENT_ID = "PID-8675309"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
INSTALL = "apt-get install -y orthanc orthanc-dicomweb orthanc-wsi"


def dicomweb_plugin() -> str | None:
    for folder in PLUGIN_DIRS:
        for name in ("libOrthancDicomWeb.so", "libOrthancDicomWeb.so.1.7"):
            if Path(folder, name).exists():
                return str(Path(folder, name))
    found = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")) if Path("/usr/lib/orthanc").exists() else []
    return str(found[0]) if found else None


def missing() -> list[str]:
    """What this machine lacks to run a PACS (empty when everything is there)."""
    out = []
    if not Path(ORTHANC).exists():
        out.append("the Orthanc server")
    if dicomweb_plugin() is None:
        out.append("its DICOMweb plugin")
    if not Path(DICOMIZER).exists():
        out.append("OrthancWSIDicomizer")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str | None = None

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def upload(self, data: bytes) -> dict:
        r = httpx.post(
            f"{self.url}/instances",
            content=data,
            headers={"Content-Type": "application/dicom", **self.headers()},
            timeout=60,
        )
        r.raise_for_status()
        return r.json()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted by the kernel, nothing ever answers."""
        self.proc.send_signal(19)

    def resume(self) -> None:
        self.proc.send_signal(18)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def orthanc(work: Path, *, token: str | None = None) -> Iterator[Orthanc]:
    """Run Orthanc + DICOMweb on a free loopback port, storage in ``work``; with ``token``, every request needs
    ``Authorization: Bearer <token>`` (a Lua filter; Orthanc answers 403 otherwise)."""
    plugin = dicomweb_plugin()
    if plugin is None or not Path(ORTHANC).exists():
        raise RuntimeError(f"Orthanc with DICOMweb is not installed: {INSTALL}")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "medgemma-tests",
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "storage"),
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    if token:
        lua = work / "filter.lua"
        lua.write_text(
            "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
            f"  return httpHeaders['authorization'] == 'Bearer {token}'\n"
            "end\n"
        )
        config["LuaScripts"] = [str(lua)]
    (work / "orthanc.json").write_text(json.dumps(config))
    log_path = work / "orthanc.log"
    env = {**os.environ, "DCMDICTPATH": os.environ.get("DCMDICTPATH", "/usr/share/libdcmtk17/dicom.dic")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Orthanc(f"http://127.0.0.1:{port}", proc, log_path, token)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{server.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/system", headers=server.headers(), timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc not ready after 30 s:\n{server.log()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        server.resume()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic studies
# --------------------------------------------------------------------------------------------------------------------


def _base(sop_class: str, modality: str, study: str, series: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128  # Orthanc hands back what it stored: without a preamble pydicom cannot read it
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = modality
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.PatientBirthDate, ds.InstitutionName = "19470101", "Zebedee General"
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _grey(ds: Dataset, pixels: np.ndarray, *, signed: bool) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()


def phantom_hu(size: int, z: float) -> np.ndarray:
    """A body-shaped disc whose radius changes with z, a bright spine: each slice differs visibly."""
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    radius = size * (0.30 + 0.12 * np.cos(z / 40.0))
    hu = np.full((size, size), -1000.0)
    hu[(xx / 1.2) ** 2 + yy**2 < radius**2] = 40.0
    hu[(xx**2 + (yy - size * 0.22) ** 2) < (size * 0.06) ** 2] = 700.0
    return hu


@dataclass
class CTSeries:
    """Expected facts about the synthetic CT, computed independently of the service."""

    study: str
    series: str
    files: list[bytes]
    main_z: list[float]  # acquisition 1 positions in instance-number order (head first: z falls)
    instance_numbers: list[int]
    found: int
    used: int
    dropped: dict[str, int] = field(default_factory=dict)


def ct_series(*, slices: int = 109, size: int = 64, seed: int = 0) -> CTSeries:
    """Acquisition 1 (``slices`` positions, instance 50 repeated), acquisition 2 (9), one DERIVED reformat."""
    study, series = generate_uid(), generate_uid()
    files: list[bytes] = []

    def slice_(number: int, z: float, acquisition: int, *, derived: bool = False, orientation: list | None = None):
        ds = _base(CT_STORAGE, "CT", study, series)
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"] if derived else ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber, ds.AcquisitionNumber = number, acquisition
        ds.ImagePositionPatient = [-100.0, -100.0, z]
        ds.ImageOrientationPatient = orientation or [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [3.0, 3.0]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        _grey(ds, phantom_hu(size, z) + 1024, signed=True)
        files.append(encode(ds))

    main_z = [200.0 - 2.5 * k for k in range(slices)]
    for k, z in enumerate(main_z, start=1):
        slice_(k, z, 1)
    repeated = min(50, slices)
    slice_(repeated, main_z[repeated - 1], 1)  # the same instance number stored twice
    for k in range(9):
        slice_(slices + 1 + k, 100.0 - 5.0 * k, 2)
    slice_(slices + 10, 0.0, 1, derived=True, orientation=[1.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    random.Random(seed).shuffle(files)
    return CTSeries(
        study=study,
        series=series,
        files=files,
        main_z=main_z,
        instance_numbers=list(range(1, slices + 1)),
        found=len(files),
        used=slices,
        dropped={"derived": 1, "other_acquisitions": 9, "duplicate_instance_numbers": 1},
    )


@dataclass
class MRSeries:
    study: str
    series: str
    files: list[bytes]
    x: list[float]  # patient x of each slice, in instance-number order


def mr_series(*, slices: int = 24, size: int = 48) -> MRSeries:
    """Sagittal slices (normal along -x), each brighter than the last: a volume min-max keeps them different."""
    study, series = generate_uid(), generate_uid()
    xs = [-60.0 + 5.0 * k for k in range(slices)]
    files = []
    for k, x in enumerate(xs, start=1):
        ds = _base(MR_STORAGE, "MR", study, series)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.InstanceNumber, ds.AcquisitionNumber = k, 1
        ds.ImagePositionPatient = [x, -120.0, 120.0]
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        yy, xx = np.mgrid[0:size, 0:size]
        _grey(ds, (xx + yy) * 10 + 40 * k, signed=False)
        files.append(encode(ds))
    random.Random(1).shuffle(files)
    return MRSeries(study, series, files, xs)


def radiograph() -> tuple[str, str, str, bytes]:
    """(study, series, instance, file) of one DX chest radiograph."""
    study, series = generate_uid(), generate_uid()
    ds = _base(DX_STORAGE, "DX", study, series)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    yy, xx = np.mgrid[0:80, 0:64]
    _grey(ds, (xx * 30 + yy * 20) % 4096, signed=False)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return study, series, ds.SOPInstanceUID, encode(ds)


def structured_report() -> tuple[str, str, str, bytes]:
    """(study, series, instance, file) of a basic text SR: a DICOM object with no image."""
    study, series = generate_uid(), generate_uid()
    ds = _base(SR_STORAGE, "SR", study, series)
    ds.InstanceNumber = 1
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    return study, series, ds.SOPInstanceUID, encode(ds)


# --------------------------------------------------------------------------------------------------------------------
# Whole-slide images
# --------------------------------------------------------------------------------------------------------------------

#: The synthetic slide: base 3584 px at 0.5 um/px (20x), three halvings. At 10x (1792 px) it has 2 x 2 patches of
#: 896 px, three of them tissue (all but the bottom-right quadrant): the expected patch count is 3.
SLIDE_LEVELS = ((3584, 0.5), (1792, 1.0), (896, 2.0), (448, 4.0))
SLIDE_TISSUE_PATCHES = 3


def _slide_level(size: int, rng: np.random.Generator) -> np.ndarray:
    img = np.full((size, size, 3), 242, np.uint8)  # glass
    texture = rng.integers(0, 60, (size, size), dtype=np.uint8)
    stain = np.stack([200 - texture, 120 - texture // 2, 170 - texture // 3], axis=-1).astype(np.uint8)
    tissue = np.ones((size, size), bool)
    tissue[size // 2 :, size // 2 :] = False
    img[tissue] = stain[tissue]
    return img


def slide_levels(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_slide_level(size, rng) for size, _ in SLIDE_LEVELS]


def write_svs(path: Path, levels: list[np.ndarray]) -> Path:
    """An Aperio-style SVS: tiled JPEG base with the Aperio description, a thumbnail, then the tiled levels."""
    import tifffile

    size, mpp = SLIDE_LEVELS[0][0], SLIDE_LEVELS[0][1]
    desc = (
        f"Aperio Image Library v12.0.0\r\n{size}x{size} [0,0 {size}x{size}] (256x256) JPEG Q=90|AppMag = 20|MPP = {mpp}"
    )
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(256, 256), compression="jpeg", photometric="rgb", description=desc)
        tif.write(levels[-1][::2, ::2].copy(), compression="jpeg", photometric="rgb", description="Aperio thumbnail")
        for level in levels[1:]:
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1, description="")
    return path


def dicom_wsi(work: Path, levels: list[np.ndarray]) -> list[bytes]:
    """The same slide as DICOM WSI instances (one per level), made by Debian's OrthancWSIDicomizer."""
    import tifffile

    work.mkdir(parents=True, exist_ok=True)
    tiff = work / "pyramid.tiff"
    with tifffile.TiffWriter(tiff) as tif:
        for i, level in enumerate(levels):
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=0 if i == 0 else 1)
    dataset = work / "dataset.json"
    dataset.write_text(
        json.dumps(
            {
                "PatientName": PATIENT_NAME,
                "PatientID": PATIENT_ID,
                "ImageType": "ORIGINAL\\PRIMARY\\VOLUME\\NONE",  # wsidicom reads only VOLUME levels
                "SeriesNumber": "1",
                "FocusMethod": "AUTO",
                "ExtendedDepthOfField": "NO",
                "SpecimenLabelInImage": "NO",
                "BurnedInAnnotation": "NO",
            }
        )
    )
    out = work / "dcm"
    out.mkdir(exist_ok=True)
    width_mm = SLIDE_LEVELS[0][0] * SLIDE_LEVELS[0][1] / 1000
    env = {**os.environ, "DCMDICTPATH": os.environ.get("DCMDICTPATH", "/usr/share/libdcmtk17/dicom.dic")}
    subprocess.run(
        [
            DICOMIZER,
            "--dataset",
            str(dataset),
            "--folder",
            str(out),
            "--imaged-width",
            str(width_mm),
            "--imaged-height",
            str(width_mm),
            str(tiff),
        ],
        capture_output=True,
        env=env,
        timeout=120,
        check=True,
    )
    return [p.read_bytes() for p in sorted(out.glob("*.dcm"))]


@dataclass
class PacsData:
    """What was loaded into the PACS, with the URLs a request names."""

    root: str
    ct: CTSeries
    mr: MRSeries
    radiograph: tuple[str, str, str]
    report: tuple[str, str, str]
    wsi: tuple[str, str]
    svs: Path
    big_ct: CTSeries  # 512 x 512 slices: several MB, for the byte-cap test

    @property
    def big_ct_url(self) -> str:
        return self.series_url(self.big_ct.study, self.big_ct.series)

    def series_url(self, study: str, series: str) -> str:
        return f"{self.root}/studies/{study}/series/{series}"

    @property
    def ct_url(self) -> str:
        return self.series_url(self.ct.study, self.ct.series)

    @property
    def mr_url(self) -> str:
        return self.series_url(self.mr.study, self.mr.series)

    @property
    def radiograph_url(self) -> str:
        study, series, instance = self.radiograph
        return f"{self.series_url(study, series)}/instances/{instance}"

    @property
    def report_url(self) -> str:
        study, series, instance = self.report
        return f"{self.series_url(study, series)}/instances/{instance}"

    @property
    def wsi_url(self) -> str:
        return self.series_url(*self.wsi)


def load_study_set(server: Orthanc, work: Path) -> PacsData:
    """Make every synthetic object and upload it; the CT in shuffled order."""
    import pydicom

    ct = ct_series()
    mr = mr_series()
    dx_study, dx_series, dx_instance, dx = radiograph()
    sr_study, sr_series, sr_instance, sr = structured_report()
    big = ct_series(slices=12, size=512, seed=2)
    levels = slide_levels()
    wsi_files = dicom_wsi(work / "wsi", levels)
    for data in [*ct.files, *mr.files, dx, sr, *wsi_files, *big.files]:
        server.upload(data)
    head = pydicom.dcmread(io.BytesIO(wsi_files[0]), stop_before_pixels=True)
    return PacsData(
        root=server.dicomweb,
        ct=ct,
        mr=mr,
        radiograph=(dx_study, dx_series, dx_instance),
        report=(sr_study, sr_series, sr_instance),
        wsi=(str(head.StudyInstanceUID), str(head.SeriesInstanceUID)),
        svs=write_svs(work / "slide.svs", levels),
        big_ct=big,
    )
