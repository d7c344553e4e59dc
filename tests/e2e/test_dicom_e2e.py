"""Medical images end to end through HTTP: DICOM (simple format), a CT series in the chat format, 16-bit PNG."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import bentoml_serve, wait_for_model

pytestmark = pytest.mark.e2e
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def server(tiny_vlm, tmp_path_factory):
    with bentoml_serve({"MEDGEMMA_MODEL": str(tiny_vlm)}, tmp_path_factory.mktemp("dicom")) as srv:
        wait_for_model(srv.url, tiny_vlm.name)
        yield srv


@pytest.fixture(scope="module")
def generate(server, tiny_vlm):
    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{server.url}/{tiny_vlm.name}/v1/generate", json=body, timeout=120)

    return post


def dicom_uri(ds: Dataset) -> str:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return "data:application/dicom;base64," + base64.b64encode(buf.getvalue()).decode()


def ct_slice(instance: int, z: float, hu: np.ndarray) -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Series^Patient"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
    return ds


def test_dicom_radiograph_simple_format(generate):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = 32, 48
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1000, 2000
    ds.PixelData = np.full((32, 48), 500, dtype=np.uint16).tobytes()
    r = generate({"text": "Describe this chest X-ray", "image": dicom_uri(ds), "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    (info,) = body["images"]
    assert info["source"] == "dicom"
    assert info["modality"] == "CR"
    assert info["inverted"] is True
    assert info["window"]["center"] == 1000 and info["window"]["width"] == 2000
    assert info["size"] == [48, 32]


def test_ct_series_of_24_slices_in_chat_format(generate):
    rng = np.random.default_rng(1)
    # sent out of order: the service orders them by slice and labels each "SLICE n"
    order = list(rng.permutation(24))
    parts = [{"type": "text", "text": "Summarise this CT series."}]
    for i in order:
        hu = rng.integers(-1000, 1500, (16, 16)).astype(np.int16)
        parts.append({"type": "image", "image": dicom_uri(ct_slice(int(i) + 1, -10.0 * int(i), hu))})
    r = generate({"messages": [{"role": "user", "content": parts}], "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    infos = body["images"]
    assert len(infos) == 24
    assert [im["instance_number"] for im in infos] == list(range(1, 25))
    assert all(im["modality"] == "CT" and im["window"]["source"] == "ct_rgb" for im in infos)
    assert infos[0]["ct_windows"] == [[-1024, 1024], [-135, 215], [0, 80]]
    # each image costs boi + 4 soft tokens + eoi in the tiny model, plus the "SLICE n" labels
    assert body["compute_metrics"]["input_tokens"] > 24 * 6
    assert "Series" not in r.text and "Patient" not in r.text


def test_16_bit_png(generate):
    arr = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = generate({"text": "What is this?", "image": uri, "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    (info,) = r.json()["images"]
    assert info["source"] == "png"
    assert info["original_mode"].startswith("I;16") or info["original_mode"] == "I"
    assert info["window"]["source"] == "minmax"
    assert info["window"]["center"] == 2000 and info["window"]["width"] == 2000


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff garbage",
        b"\x00" * 128 + b"DICM",
    ],
)
def test_malformed_dicom_is_4xx(generate, payload):
    uri = "data:application/dicom;base64," + base64.b64encode(payload).decode()
    r = generate({"text": "read this", "image": uri})
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body["status"] == "error" and body["param"] == "image"
    assert generate({"text": "still fine", "max_new_tokens": 2}).status_code == 200


def test_dicom_upload_through_the_bentoml_client(server, tmp_path):
    import bentoml

    ds = ct_slice(1, 0.0, np.zeros((16, 16), dtype=np.int16))
    path = tmp_path / "slice.dcm"
    ds.save_as(path, enforce_file_format=True)
    import pathlib

    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        body = client.generate(text="CT slice", image=pathlib.Path(path), max_new_tokens=3)
    assert body["status"] == "success"
    assert body["images"][0]["source"] == "dicom"
    assert body["images"][0]["modality"] == "CT"
