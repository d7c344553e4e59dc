"""DICOM to RGB: every expected pixel value is worked out by hand in the comments next to it.

Window formula under test (LINEAR_EXACT, round half up): lo = c - w/2, out = floor(clip((v - lo) * 255 / w,
0, 255) + 0.5). Inputs are built here with pydicom, numpy and Pillow; no files from outside.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medgemma.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from medgemma.imaging import ImageLimits, Window, load_images, parse_data_uri

MARKER = "ZZSECRET42"

# HU of the CT test row and the stored values (slope 1, intercept -1024 -> stored = HU + 1024).
CT_HU = [-1024, -135, 0, 40, 80, 215, 1024, 3000]
# R window -1024..1024 (w 2048): (HU + 1024) * 255 / 2048
#   -1024 -> 0; -135 -> 889*255/2048 = 110.69 -> 111; 0 -> 127.5 -> 128; 40 -> 1064*255/2048 = 132.48 -> 132;
#   80 -> 1104*255/2048 = 137.46 -> 137; 215 -> 1239*255/2048 = 154.27 -> 154; 1024 -> 255; 3000 -> clip 255
CT_R = [0, 111, 128, 132, 137, 154, 255, 255]
# G window -135..215 (w 350): (HU + 135) * 255 / 350
#   -1024 -> clip 0; -135 -> 0; 0 -> 135*255/350 = 98.36 -> 98; 40 -> 175*255/350 = 127.5 -> 128;
#   80 -> 215*255/350 = 156.64 -> 157; 215 -> 255; 1024, 3000 -> clip 255
CT_G = [0, 0, 98, 128, 157, 255, 255, 255]
# B window 0..80 (w 80): HU * 255 / 80
#   -1024, -135 -> clip 0; 0 -> 0; 40 -> 127.5 -> 128; 80 -> 255; 215, 1024, 3000 -> clip 255
CT_B = [0, 0, 0, 128, 255, 255, 255, 255]


def make_ds(
    arr: np.ndarray,
    *,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    bits_allocated: int = 16,
    bits_stored: int = 12,
    signed: bool = False,
    tsyntax: str = ExplicitVRLittleEndian,
    **tags: object,
) -> FileDataset:
    """A Part 10 data set around ``arr`` (rows, cols), (frames, rows, cols) or (rows, cols, 3)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tsyntax
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = arr.shape[0], arr.shape[1]
    else:
        ds.Rows, ds.Columns = arr.shape[-2], arr.shape[-1]
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def plant_patient_data(ds: Dataset) -> Dataset:
    ds.PatientName = f"{MARKER}^Jane"
    ds.PatientID = f"{MARKER}-ID"
    ds.PatientBirthDate = "19010203"
    ds.StudyDate = "20240117"
    ds.AccessionNumber = MARKER
    ds.InstitutionName = f"{MARKER} Hospital"
    ds.ReferringPhysicianName = MARKER
    ds.StudyDescription = MARKER
    return ds


def pixels(prepared) -> np.ndarray:
    return np.asarray(prepared.image)


def ct_dataset(**tags: object) -> FileDataset:
    stored = (np.array([CT_HU]) + 1024).astype(np.uint16)
    return make_ds(stored, RescaleSlope=1, RescaleIntercept=-1024, **tags)


# ------------------------------------------------------------------------------------------------- CT


def test_ct_slice_is_three_hu_windows_as_rgb():
    [prepared] = load_images(to_bytes(ct_dataset()))
    assert prepared.image.mode == "RGB"
    rgb = pixels(prepared)[0]
    assert rgb[:, 0].tolist() == CT_R
    assert rgb[:, 1].tolist() == CT_G
    assert rgb[:, 2].tolist() == CT_B
    info = prepared.info
    assert info["source"] == "dicom"
    assert info["modality"] == "CT"
    assert info["size"] == [8, 1]
    assert info["bits_stored"] == 12
    assert info["rescale"] == {"slope": 1.0, "intercept": -1024.0}
    assert info["window"]["source"] == "ct_rgb"
    assert info["ct_windows"] == [[-1024, 1024], [-135, 215], [0, 80]]
    assert info["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert info["frames"] == {"total": 1, "used": [0]}
    assert info["inverted"] is False


def test_ct_signed_stored_values_without_rescale():
    ds = make_ds(np.array([CT_HU], dtype=np.int16), bits_stored=16, signed=True)
    rgb = pixels(load_images(to_bytes(ds))[0])[0]
    assert rgb[:, 0].tolist() == CT_R
    assert rgb[:, 1].tolist() == CT_G
    assert rgb[:, 2].tolist() == CT_B


def test_ct_request_window_goes_to_all_three_channels():
    [prepared] = load_images(to_bytes(ct_dataset()), window=Window(center=40, width=80))
    rgb = pixels(prepared)[0]
    # lo = 0, hi = 80: -1024, -135, 0 -> 0; 40 -> 127.5 -> 128; 80 and above -> 255
    expected = [0, 0, 0, 128, 255, 255, 255, 255]
    for channel in range(3):
        assert rgb[:, channel].tolist() == expected
    assert prepared.info["window"] == {
        "center": 40.0,
        "width": 80.0,
        "source": "request",
        "function": "linear",
    }
    assert "ct_windows" not in prepared.info


# ------------------------------------------------------------------------------------------ radiographs

RADIOGRAPH_VALUES = [0, 500, 1000, 2000, 3000]


def test_monochrome1_radiograph_window_then_inversion():
    ds = make_ds(
        np.array([RADIOGRAPH_VALUES], dtype=np.uint16),
        modality="CR",
        photometric="MONOCHROME1",
        WindowCenter=[1000, 400],  # multi-valued: the first value is used
        WindowWidth=[2000, 800],
    )
    [prepared] = load_images(to_bytes(ds))
    grey = pixels(prepared)[0]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    # lo = 0, w = 2000: 0 -> 0; 500 -> 63.75 -> 64; 1000 -> 127.5 -> 128; 2000 -> 255; 3000 -> clip 255
    # MONOCHROME1 inverts: 255 - x
    assert grey[:, 0].tolist() == [255, 191, 127, 0, 0]
    assert prepared.info["window"] == {
        "center": 1000.0,
        "width": 2000.0,
        "source": "dicom",
        "function": "linear",
    }
    assert prepared.info["inverted"] is True
    assert prepared.info["photometric"] == "MONOCHROME1"


def test_radiograph_window_applies_after_rescale():
    ds = make_ds(
        np.array([[50, 300, 550]], dtype=np.uint16),
        modality="DX",
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=500,
        WindowWidth=1000,
    )
    grey = pixels(load_images(to_bytes(ds))[0])[0, :, 0]
    # rescaled: 50*2-100 = 0, 300*2-100 = 500, 550*2-100 = 1000; lo = 0, w = 1000
    # 0 -> 0; 500 -> 127.5 -> 128; 1000 -> 255
    assert grey.tolist() == [0, 128, 255]


def test_radiograph_without_window_uses_min_max():
    ds = make_ds(np.array([[100, 150, 300]], dtype=np.uint16), modality="DX")
    [prepared] = load_images(to_bytes(ds))
    # min 100, max 300, w = 200: 100 -> 0; 150 -> 50*255/200 = 63.75 -> 64; 300 -> 255
    assert pixels(prepared)[0, :, 0].tolist() == [0, 64, 255]
    assert prepared.info["window"] == {
        "center": 200.0,
        "width": 200.0,
        "source": "minmax",
        "function": "linear",
    }
    assert prepared.info["inverted"] is False


def test_request_window_overrides_file_window_and_monochrome1_still_inverts():
    ds = make_ds(
        np.array([[0, 100, 200]], dtype=np.uint16),
        modality="CR",
        photometric="MONOCHROME1",
        WindowCenter=1000,
        WindowWidth=2000,
    )
    [prepared] = load_images(to_bytes(ds), window=Window(center=100, width=200))
    # lo = 0, w = 200: 0 -> 0; 100 -> 127.5 -> 128; 200 -> 255; inverted: 255, 127, 0
    assert pixels(prepared)[0, :, 0].tolist() == [255, 127, 0]
    assert prepared.info["window"]["source"] == "request"


def test_sigmoid_voi_function():
    ds = make_ds(
        np.array([[100, 200, 300]], dtype=np.uint16),
        modality="DX",
        WindowCenter=200,
        WindowWidth=100,
        VOILUTFunction="SIGMOID",
    )
    [prepared] = load_images(to_bytes(ds))
    # 255 / (1 + exp(-4 (v - 200) / 100)):
    #   100 -> 255 / (1 + e^4) = 255 / 55.598 = 4.59 -> 5; 200 -> 127.5 -> 128;
    #   300 -> 255 / (1 + e^-4) = 250.41 -> 250
    assert pixels(prepared)[0, :, 0].tolist() == [5, 128, 250]
    assert prepared.info["window"]["function"] == "sigmoid"


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_is_preferred_over_window(vr):
    ds = make_ds(
        np.array([[50, 100, 101, 102, 103, 500]], dtype=np.uint16),
        modality="CR",
        WindowCenter=0,
        WindowWidth=1,
    )
    item = Dataset()
    item.LUTDescriptor = [4, 100, 8]  # 4 entries, first input value mapped is 100, 8 bits
    table = [0, 50, 100, 200]
    item.add_new("LUTData", vr, table if vr == "US" else np.array(table, dtype="<u2").tobytes())
    ds.VOILUTSequence = Sequence([item])
    [prepared] = load_images(to_bytes(ds))
    # inputs below 100 take entry 0, above 103 the last entry: LUT outputs 0, 0, 50, 100, 200, 200
    # the LUT's own range 0..200 maps to 0..255: 50 -> 63.75 -> 64; 100 -> 127.5 -> 128; 200 -> 255
    assert pixels(prepared)[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255]
    assert prepared.info["window"]["source"] == "voi_lut"
    assert prepared.info["voi_lut"] == {"entries": 4, "first_mapped": 100, "bits": 8}


# ------------------------------------------------------------------------------------------ MR, colour


def test_mr_is_min_max_and_ignores_stored_window():
    ds = make_ds(np.array([[20, 30, 60]], dtype=np.uint16), modality="MR", WindowCenter=5000, WindowWidth=10)
    [prepared] = load_images(to_bytes(ds))
    # min 20, max 60, w = 40: 20 -> 0; 30 -> 10*255/40 = 63.75 -> 64; 60 -> 255
    assert pixels(prepared)[0, :, 0].tolist() == [0, 64, 255]
    assert prepared.info["window"]["source"] == "minmax"


def test_mr_request_window_and_constant_image():
    ds = make_ds(np.array([[20, 30, 60]], dtype=np.uint16), modality="MR")
    [prepared] = load_images(to_bytes(ds), window=Window(center=40, width=40))
    # lo = 20, w = 40: 20 -> 0; 30 -> 63.75 -> 64; 60 -> 255
    assert pixels(prepared)[0, :, 0].tolist() == [0, 64, 255]
    flat = make_ds(np.full((2, 3), 700, dtype=np.uint16), modality="MR")
    assert not pixels(load_images(to_bytes(flat))[0]).any()


def test_rgb_dicom_is_passed_through():
    arr = np.array([[[255, 0, 0], [0, 255, 0], [10, 20, 30]]], dtype=np.uint8)
    ds = make_ds(arr, modality="US", photometric="RGB", bits_allocated=8, bits_stored=8)
    [prepared] = load_images(to_bytes(ds), window=Window(center=1, width=2))
    assert pixels(prepared).tolist() == arr.tolist()
    assert prepared.info["window_ignored"] == "colour image"
    assert "window" not in prepared.info


def test_16_bit_rgb_dicom_is_scaled_by_bits_stored():
    arr = np.array([[[4095, 0, 2048]]], dtype=np.uint16)
    ds = make_ds(arr, modality="SM", photometric="RGB", bits_allocated=16, bits_stored=12)
    # 0..4095 -> 0..255: 4095 -> 255; 0 -> 0; 2048 * 255 / 4095 = 127.53 -> 128
    assert pixels(load_images(to_bytes(ds))[0]).tolist() == [[[255, 0, 128]]]


def test_ybr_full_dicom_is_converted_to_rgb():
    # Y=128, Cb=128, Cr=128 is mid grey; Y=76, Cb=85, Cr=255:
    #   R = Y + 1.402 (Cr - 128) = 76 + 178.05 = 254.05; G = Y - 0.344136 (Cb - 128) - 0.714136 (Cr - 128)
    #   = 76 + 14.80 - 90.70 = 0.10; B = Y + 1.772 (Cb - 128) = 76 - 76.20 = -0.20 -> 0 (pydicom rounds: +-1)
    arr = np.array([[[128, 128, 128], [76, 85, 255]]], dtype=np.uint8)
    ds = make_ds(arr, modality="XC", photometric="YBR_FULL", bits_allocated=8, bits_stored=8)
    rgb = pixels(load_images(to_bytes(ds))[0]).astype(int)
    assert np.abs(rgb[0, 0] - [128, 128, 128]).max() <= 1
    assert np.abs(rgb[0, 1] - [254, 0, 0]).max() <= 1


def test_palette_colour_dicom():
    ds = make_ds(
        np.array([[0, 1, 2, 3]], dtype=np.uint8),
        modality="US",
        photometric="PALETTE COLOR",
        bits_allocated=8,
        bits_stored=8,
    )
    for colour, values in (("Red", [0, 255, 0, 10]), ("Green", [0, 0, 255, 20]), ("Blue", [0, 0, 0, 30])):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 8])
        setattr(ds, f"{colour}PaletteColorLookupTableData", bytes(values))
    assert pixels(load_images(to_bytes(ds))[0]).tolist() == [[[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]]]


# ------------------------------------------------------------------------------------------ multi-frame


def multi_frame(n: int) -> bytes:
    # frame k is filled with 64 k; window lo = 0, w = 256 -> 64 k * 255 / 256
    #   0 -> 0; 64 -> 63.75 -> 64; 128 -> 127.5 -> 128; 192 -> 191.25 -> 191; 256 -> 255
    arr = np.stack([np.full((2, 2), 64 * k, dtype=np.uint16) for k in range(n)])
    return to_bytes(make_ds(arr, modality="XA", WindowCenter=128, WindowWidth=256))


def test_multi_frame_middle_is_the_default():
    [prepared] = load_images(multi_frame(5))
    assert pixels(prepared)[0, 0].tolist() == [128, 128, 128]  # frame 5 // 2 = 2 -> 128
    assert prepared.info["frames"] == {"total": 5, "used": [2]}
    assert prepared.info["frame"] == 2
    [even] = load_images(multi_frame(4))  # 4 // 2 = 2
    assert even.info["frame"] == 2


def test_multi_frame_first_and_all():
    [first] = load_images(multi_frame(5), frames="first")
    assert pixels(first)[0, 0, 0] == 0
    everything = load_images(multi_frame(5), frames="all")
    assert [int(pixels(p)[1, 1, 0]) for p in everything] == [0, 64, 128, 191, 255]
    assert [p.info["frame"] for p in everything] == [0, 1, 2, 3, 4]
    assert everything[0].info["frames"] == {"total": 5, "used": [0, 1, 2, 3, 4]}


def test_multi_frame_all_over_max_frames_is_refused():
    limits = ImageLimits(max_frames=4)
    with pytest.raises(BadRequest, match="5 frames; at most 4") as err:
        load_images(multi_frame(5), frames="all", limits=limits, param="messages[0].image")
    assert err.value.param == "messages[0].image"
    assert len(load_images(multi_frame(5), frames="middle", limits=limits)) == 1


def test_enhanced_multi_frame_ct_uses_functional_groups():
    stored = np.stack([np.array([[0, 1024]], dtype=np.uint16), np.array([[1064, 2048]], dtype=np.uint16)])
    ds = make_ds(stored)
    transform = Dataset()
    transform.RescaleSlope = 1
    transform.RescaleIntercept = -1024
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for z in (-10.0, -12.5):
        position = Dataset()
        position.ImagePositionPatient = [0, 0, z]
        group = Dataset()
        group.PlanePositionSequence = Sequence([position])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    prepared = load_images(to_bytes(ds), frames="all")
    # frame 0: HU -1024, 0 -> R 0, 128; frame 1: HU 40, 1024 -> R 132, 255 (see CT_R)
    assert pixels(prepared[0])[0, :, 0].tolist() == [0, 128]
    assert pixels(prepared[1])[0, :, 0].tolist() == [132, 255]
    assert pixels(prepared[1])[0, :, 2].tolist() == [128, 255]  # B: 40 -> 127.5 -> 128
    assert [p.info["slice_location"] for p in prepared] == [-10.0, -12.5]


def test_slice_ordering_info():
    ds = ct_dataset(
        InstanceNumber=12,
        ImagePositionPatient=[-100.0, -120.0, -34.5],
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
    )
    [prepared] = load_images(to_bytes(ds))
    assert prepared.info["instance_number"] == 12
    assert prepared.info["slice_location"] == -34.5  # normal (0, 0, 1) . position


# ------------------------------------------------------------------------------------------ compressed


def test_rle_lossless_decodes_exactly():
    ds = ct_dataset()
    ds.compress(RLELossless)
    [prepared] = load_images(to_bytes(ds))
    assert prepared.info["transfer_syntax"] == RLELossless
    assert pixels(prepared)[0, :, 0].tolist() == CT_R
    assert pixels(prepared)[0, :, 2].tolist() == CT_B


@pytest.mark.skipif(
    not (get_encoder(JPEG2000Lossless).is_available and get_decoder(JPEG2000Lossless).is_available),
    reason="needs pylibjpeg-openjpeg (a dependency of this project)",
)
def test_jpeg2000_lossless_decodes_exactly():
    # the OpenJPEG encoder needs at least 32x32 pixels
    stored = np.tile(np.array([CT_HU]) + 1024, (32, 4)).astype(np.uint16)
    ds = make_ds(stored, RescaleSlope=1, RescaleIntercept=-1024)
    ds.compress(JPEG2000Lossless)
    [prepared] = load_images(to_bytes(ds))
    assert prepared.info["transfer_syntax"] == JPEG2000Lossless
    assert pixels(prepared)[5, :8, 1].tolist() == CT_G


def jpeg_dicom(image: Image.Image, photometric: str, **tags: object) -> FileDataset:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, subsampling=0)
    samples = 1 if image.mode == "L" else 3
    shape = (image.height, image.width) if samples == 1 else (image.height, image.width, 3)
    ds = make_ds(
        np.zeros(shape, dtype=np.uint8),
        photometric=photometric,
        bits_allocated=8,
        bits_stored=8,
        tsyntax=JPEGBaseline8Bit,
        **tags,
    )
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    return ds


@pytest.mark.skipif(not get_decoder(JPEGBaseline8Bit).is_available, reason="no JPEG decoder installed")
def test_jpeg_baseline_grey_and_colour():
    # flat 8x8 blocks survive JPEG at quality 95 to within a grey level or two
    grey = np.kron(np.array([[0, 100], [200, 255]], dtype=np.uint8), np.ones((8, 8), dtype=np.uint8))
    ds = jpeg_dicom(Image.fromarray(grey), "MONOCHROME2", modality="DX", WindowCenter=127.5, WindowWidth=255)
    [prepared] = load_images(to_bytes(ds))
    assert prepared.info["transfer_syntax"] == JPEGBaseline8Bit
    # lo = 0, w = 255: the window is the identity on 0..255
    out = pixels(prepared)[:, :, 0].astype(int)
    assert np.abs(out[::8, ::8] - [[0, 100], [200, 255]]).max() <= 2

    colour = np.zeros((16, 16, 3), dtype=np.uint8)
    colour[:8, :8] = [200, 30, 30]
    colour[8:, 8:] = [30, 30, 200]
    ds = jpeg_dicom(Image.fromarray(colour), "YBR_FULL", modality="XC")
    rgb = pixels(load_images(to_bytes(ds))[0]).astype(int)
    assert np.abs(rgb[4, 4] - [200, 30, 30]).max() <= 3
    assert np.abs(rgb[12, 12] - [30, 30, 200]).max() <= 3


def test_missing_decoder_suggests_the_codecs_extra(monkeypatch):
    decoder = get_decoder(JPEGBaseline8Bit)
    monkeypatch.setattr(decoder, "_available", {})  # as if neither Pillow nor pylibjpeg could decode JPEG
    ds = jpeg_dicom(Image.new("L", (8, 8)), "MONOCHROME2")
    with pytest.raises(UnsupportedMediaType) as err:
        load_images(to_bytes(ds))
    message = err.value.message
    assert "1.2.840.10008.1.2.4.50" in message
    assert "JPEG Baseline" in message
    assert "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg" in message
    assert err.value.status_code == 415


def test_transfer_syntax_without_any_decoder_is_415():
    ds = make_ds(np.zeros((2, 2), dtype=np.uint8), bits_allocated=8, bits_stored=8, tsyntax=MPEG2MPML)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 12])
    ds["PixelData"].VR = "OB"
    with pytest.raises(UnsupportedMediaType, match=r"1\.2\.840\.10008\.1\.2\.4\.100 \(MPEG2"):
        load_images(to_bytes(ds))


def test_corrupt_compressed_pixel_data_is_a_bad_request():
    ds = jpeg_dicom(Image.new("L", (8, 8)), "MONOCHROME2")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not really a jpeg"])
    with pytest.raises(BadRequest, match="could not be decoded"):
        load_images(to_bytes(ds))


# ------------------------------------------------------------------------------------------ file shapes


def test_dicom_without_preamble_and_file_meta_is_read():
    ds = ct_dataset()
    ds.file_meta = FileMetaDataset()  # no transfer syntax: the reader has to infer implicit VR LE
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    raw = buffer.getvalue()
    assert raw[128:132] != b"DICM"
    [prepared] = load_images(raw)
    assert prepared.info["transfer_syntax"] == ImplicitVRLittleEndian
    assert pixels(prepared)[0, :, 0].tolist() == CT_R


def test_dicom_media_type_reads_dicom_without_preamble():
    ds = ct_dataset()
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    [prepared] = load_images(data, media_type="application/dicom")
    assert pixels(prepared)[0, :, 1].tolist() == CT_G


def test_data_uri_to_dicom_end_to_end():
    import base64

    uri = "data:application/dicom;base64," + base64.b64encode(to_bytes(ct_dataset())).decode()
    media_type, data = parse_data_uri(uri)
    [prepared] = load_images(data, media_type=media_type)
    assert pixels(prepared)[0, :, 0].tolist() == CT_R


# ------------------------------------------------------------------------------------------ failures


def test_no_pixel_data_is_a_bad_request():
    ds = ct_dataset()
    del ds.PixelData
    with pytest.raises(BadRequest, match="no pixel data") as err:
        load_images(to_bytes(ds), param="img")
    assert err.value.param == "img"


def test_missing_image_attributes_are_named():
    ds = ct_dataset()
    del ds.Rows
    with pytest.raises(BadRequest, match="Rows"):
        load_images(to_bytes(ds))


@pytest.mark.parametrize("cut", [140, 300, -3])
def test_truncated_file_is_a_bad_request(cut):
    data = to_bytes(ct_dataset())
    with pytest.raises(BadRequest):
        load_images(data[:cut])


def test_garbage_after_preamble_is_a_bad_request():
    data = b"\0" * 128 + b"DICM" + bytes(range(256)) * 4
    with pytest.raises(BadRequest):
        load_images(data)


def test_rows_columns_checked_before_pixel_data():
    ds = make_ds(np.zeros((2, 2), dtype=np.uint16))
    ds.Rows, ds.Columns = 10000, 10000  # the pixel data is far too short, but the size check comes first
    with pytest.raises(PayloadTooLarge, match="10000x10000"):
        load_images(to_bytes(ds))
    with pytest.raises(PayloadTooLarge):
        load_images(to_bytes(ct_dataset()), limits=ImageLimits(max_pixels=7))


def test_oversized_file_bytes():
    with pytest.raises(PayloadTooLarge):
        load_images(to_bytes(ct_dataset()), limits=ImageLimits(max_bytes=100))


def test_patient_data_never_reaches_info_or_errors():
    allowed = {
        "source",
        "modality",
        "size",
        "photometric",
        "bits_stored",
        "transfer_syntax",
        "frames",
        "frame",
        "rescale",
        "window",
        "ct_windows",
        "inverted",
        "instance_number",
        "slice_location",
    }
    [prepared] = load_images(to_bytes(plant_patient_data(ct_dataset(InstanceNumber=3))))
    text = json.dumps(prepared.info)
    assert set(prepared.info) <= allowed
    for secret in (MARKER, "19010203", "20240117", "Hospital", "Jane"):
        assert secret not in text

    failures: list[bytes] = []
    no_pixels = plant_patient_data(ct_dataset())
    del no_pixels.PixelData
    failures.append(to_bytes(no_pixels))
    no_rows = plant_patient_data(ct_dataset())
    del no_rows.Rows
    failures.append(to_bytes(no_rows))
    bad_frames = plant_patient_data(ct_dataset())
    bad_frames.NumberOfFrames = 0
    failures.append(to_bytes(bad_frames))
    truncated = to_bytes(plant_patient_data(ct_dataset()))
    failures.append(truncated[:-5])
    failures.append(truncated[: truncated.find(MARKER.encode()) + 4])
    bad_syntax = plant_patient_data(make_ds(np.zeros((2, 2), dtype=np.uint8), tsyntax=MPEG2MPML))
    bad_syntax.PixelData = encapsulate([b"\0" * 8])
    failures.append(to_bytes(bad_syntax))
    for data in failures:
        with pytest.raises(ServiceError) as err:
            load_images(data)
        body = json.dumps(err.value.body())
        assert MARKER not in body and "19010203" not in body and "20240117" not in body
