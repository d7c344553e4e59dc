"""Slides to tissue patches: level choice, tissue mask, seeded sampling, read patch by patch (tiffslide, wsidicom)."""

from __future__ import annotations

import numpy as np
import pytest

from medgemma import wsi
from medgemma.errors import BadRequest
from medgemma.pixels import ImageLimits
from tests.pacs import SLIDE_TISSUE_PATCHES, slide_levels, write_svs


@pytest.fixture(scope="module")
def svs(tmp_path_factory) -> bytes:
    return write_svs(tmp_path_factory.mktemp("svs") / "slide.svs", slide_levels()).read_bytes()


def test_level_nearest_the_magnification():
    levels = [wsi.Level(4000, 4000, 0.25, 40.0), wsi.Level(2000, 2000, 0.5, 20.0), wsi.Level(1000, 1000, 1.0, 10.0)]
    assert wsi.choose_level(levels, 10.0)[0] == 2
    assert wsi.choose_level(levels, 20.0)[0] == 1
    assert wsi.choose_level(levels, 13.0)[0] == 2  # log scale: 13 is nearer 10 than 20
    assert wsi.choose_level([wsi.Level(10, 10, None, None)], 10.0) == (0, wsi.choose_level([], 1)[1])


def test_sampling_is_seeded_capped_and_in_reading_order():
    origins = [(x, y) for y in range(0, 8960, 896) for x in range(0, 8960, 896)]  # 100 patches
    first = wsi.sample(origins, 7, seed=3)
    assert first == wsi.sample(origins, 7, seed=3) and len(first) == 7
    assert first == sorted(first, key=lambda o: (o[1], o[0]))
    assert wsi.sample(origins, 7, seed=4) != first
    assert wsi.sample(origins[:5], 125, seed=0) == origins[:5]


def test_svs_patches_at_10x_are_the_tissue_ones(svs):
    assert wsi.is_tiff_slide(svs)
    with wsi.opened(lambda: wsi.TiffSlide(svs), "image") as slide:
        assert slide.format == "svs" and [lvl.mpp for lvl in slide.levels] == [0.5, 1.0, 2.0, 4.0]
        images, report = wsi.patches(slide, magnification=10, max_patches=125, seed=0, limits=ImageLimits(), param="p")
        assert report["wsi_level"] == 1 and report["tissue_patches"] == report["patch_count"] == SLIDE_TISSUE_PATCHES
        assert [im.info["patch"]["x"] for im in images] == [0, 896, 0]
        for im in images:  # stained tissue, not glass: red clearly above blue... and not white
            arr = np.asarray(im.image)
            assert im.image.size == (896, 896) and arr.mean() < 200
        capped, report = wsi.patches(slide, magnification=10, max_patches=2, seed=1, limits=ImageLimits(), param="p")
        assert len(capped) == report["patch_count"] == 2 and report["tissue_patches"] == 3


def test_flat_tiff_is_not_a_slide_and_a_broken_one_is_a_400(svs):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="TIFF")
    assert not wsi.is_tiff_slide(buf.getvalue())
    with pytest.raises(BadRequest) as err, wsi.opened(lambda: wsi.TiffSlide(svs[:200_000]), "image") as slide:
        wsi.patches(slide, magnification=10, max_patches=125, seed=0, limits=ImageLimits(), param="image")
    assert err.value.param == "image" and "truncated" in err.value.message
