"""Series to volume: selection, order along the slice normal, the notebook's sampling, windows. Pure functions."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from medgemma import volume
from medgemma.pixels import ImageLimits
from medgemma.volume import SliceMeta
from tests.pacs import ct_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def axial(n: int | None, z: float, **kw: object) -> SliceMeta:
    return SliceMeta(key=n, modality="CT", instance_number=n, position=(0.0, 0.0, z), orientation=AXIAL, **kw)


def test_notebook_sampling_formula():
    # round(i * (n - 1) / k) for i = 1..k: hand-computed for n = 10, k = 4: 2.25, 4.5, 6.75, 9 -> 2, 5, 7, 9
    assert volume.sample_indices(10, 4) == [2, 5, 7, 9]
    assert volume.sample_indices(3, 85) == [0, 1, 2]
    for n in (86, 109, 120, 300, 1000):
        picked = volume.sample_indices(n, 85)
        assert len(picked) == len(set(picked)) == 85 and picked == sorted(picked) and picked[-1] == n - 1


def test_selection_drops_derived_other_acquisitions_and_repeated_numbers():
    slices = [axial(k, -k, acquisition_number=1, tie=f"a{k}") for k in range(1, 6)]
    slices += [axial(3, -3, acquisition_number=1, tie="a0-repeat")]  # sorts first by UID: this one is kept
    slices += [axial(k, 50 + k, acquisition_number=2) for k in range(6, 8)]
    slices += [axial(9, 0, acquisition_number=1, derived=True)]
    kept, dropped = volume.select(slices)
    assert dropped == {"derived": 1, "other_acquisitions": 2, "duplicate_instance_numbers": 1}
    assert sorted(s.instance_number for s in kept) == [1, 2, 3, 4, 5]
    assert next(s for s in kept if s.instance_number == 3).tie == "a0-repeat"


def test_order_follows_the_normal_in_the_instance_numbers_direction():
    # instance numbers run head first (z falling): the order keeps that direction, by geometry not by number
    shuffled = [axial(2, 10.0), axial(1, 20.0), axial(3, 0.0)]
    ordered, key = volume.order(shuffled)
    assert key == "slice_normal" and [s.instance_number for s in ordered] == [1, 2, 3]
    # geometry wins over inconsistent numbers: one slice numbered out of place stays where its position says
    mixed = [axial(1, 0.0), axial(5, 1.0), axial(3, 2.0), axial(4, 3.0)]
    assert [s.instance_number for s in volume.order(mixed)[0]] == [1, 5, 3, 4]


def test_order_falls_back_to_instance_numbers_then_to_the_request():
    tilted = [axial(2, 0.0), SliceMeta(key=1, modality="CT", instance_number=1, position=(0, 0, 1), orientation=None)]
    assert volume.order(tilted) == ([tilted[1], tilted[0]], "instance_number")
    bare = [SliceMeta(key=i, modality="CT") for i in range(3)]
    assert volume.order(bare) == (bare, "request")


def test_plan_report_of_the_test_ct():
    ct = ct_series(slices=109, size=8)
    import io

    import pydicom

    metas = [
        volume.slice_meta(pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True), i) for i, f in enumerate(ct.files)
    ]
    plan = volume.plan(metas, 85)
    report = plan.report()
    assert report["instances_found"] == 120 and report["instances_used"] == 109 and report["slices_sampled"] == 85
    assert report["dropped"] == ct.dropped
    assert report["slice_positions"] == [ct.main_z[i] for i in volume.sample_indices(109, 85)]
    assert volume.plan(metas[:3], 85, keep_order=True).report()["order_key"] == "request"


def _mr(value: int, z: float) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "MR", 2, 2, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        "MONOCHROME2", 16, 16, 15, 0)  # fmt: skip
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], list(AXIAL)
    ds.PixelData = np.array([[0, value], [value, value]], dtype=np.uint16).tobytes()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_mr_window_is_one_minmax_over_the_volume():
    datasets = {0: _mr(100, 0.0), 1: _mr(200, 1.0)}
    metas = [SliceMeta(key=k, modality="MR", position=(0, 0, float(k)), orientation=AXIAL) for k in datasets]
    plan = volume.plan(metas, 85)
    images, windows = volume.render(
        plan, lambda m: datasets[m.key], window=None, frames="middle", limits=ImageLimits(), param="p"
    )
    assert windows == {"kind": "minmax_volume", "lo": 0.0, "hi": 200.0}
    # 100 over 0..200 -> 127.5 -> 128 (round half up); 200 -> 255
    assert [int(np.asarray(im.image)[0, 1, 0]) for im in images] == [128, 255]
    assert [im.info["label"] for im in images] == ["SLICE 1", "SLICE 2"]


def test_no_instances_and_no_images_are_refused():
    from medgemma.errors import NotFound, UnsupportedMediaType

    with pytest.raises(NotFound):
        volume.refuse_empty([], "p", "the series")
    with pytest.raises(UnsupportedMediaType):
        volume.refuse_empty([SliceMeta(key=0, has_pixels=False)], "p", "the series")
