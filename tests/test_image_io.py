"""Decoding one image file (16-bit PNG, palette PNG, DICOM variants); large in-memory sources in the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from layouts import dicom, palette_png, png16

from medbench.data.image_io import read_image, to_uint8
from medbench.errors import DataError

RAMP = (np.arange(48 * 40).reshape(48, 40) * 33).astype(np.uint16)


def test_16_bit_png_keeps_its_values(tmp_path: Path) -> None:
    img = read_image(png16(tmp_path / "a.png", RAMP))
    assert img.dtype == np.uint16 and np.array_equal(img, RAMP)
    u8 = to_uint8(img)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255


def test_palette_png_decodes_to_its_colours(tmp_path: Path) -> None:
    arr = (np.arange(32 * 32).reshape(32, 32) % 200).astype(np.uint8)
    img = read_image(palette_png(tmp_path / "p.png", arr))
    assert img.shape == (32, 32, 3) and np.array_equal(img[..., 0], img[..., 1])


@pytest.mark.parametrize("syntax", ["explicit", "rle", "j2k"])
def test_dicom_transfer_syntaxes_are_lossless(syntax: str, tmp_path: Path) -> None:
    img = read_image(dicom(tmp_path / "m.dcm", RAMP, syntax=syntax))
    assert img.dtype == np.uint16 and np.array_equal(img, RAMP)


def test_dicom_variants(tmp_path: Path) -> None:
    # MONOCHROME1: bright means dense after inversion
    inv = read_image(dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1", syntax="j2k"))
    assert np.array_equal(inv, RAMP.max() - RAMP)
    # a data set written without the preamble, under a .dicom name (VinDr's suffix)
    bare = dicom(tmp_path / "bare.dicom", RAMP, preamble=False)
    assert bare.read_bytes()[128:132] != b"DICM" and np.array_equal(read_image(bare), RAMP)
    # multi-frame: the first frame
    assert np.array_equal(read_image(dicom(tmp_path / "mf.dcm", RAMP, frames=3)), RAMP)
    # rescale slope/intercept applied
    scaled = read_image(dicom(tmp_path / "rs.dcm", RAMP, attrs={"RescaleSlope": 2, "RescaleIntercept": -100}))
    assert scaled.dtype == np.float32 and np.allclose(scaled, RAMP.astype(np.float32) * 2 - 100)


def test_undecodable_dicom_names_file_syntax_and_decoder(tmp_path: Path) -> None:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    path = dicom(tmp_path / "ls.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG-LS stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError) as err:
        read_image(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: PixelData: cannot decode DICOM pixel data (transfer syntax JPEG-LS Lossless")
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in msg and "\n" not in msg


def test_corrupt_truncated_and_empty_files(tmp_path: Path) -> None:
    full = dicom(tmp_path / "full.dcm", RAMP, syntax="rle")
    (tmp_path / "cut.dcm").write_bytes(full.read_bytes()[:400])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 junk")
    for name, fragment in (("cut.dcm", "DICOM"), ("empty.png", r"empty \(0 bytes\)"), ("junk.jpg", "image"),
                           ("absent.png", "not found")):
        with pytest.raises(DataError, match=fragment) as err:
            read_image(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name))


def test_large_in_memory_sources_go_through_the_memory_mapped_cache(tmp_path: Path, monkeypatch) -> None:
    import polars as pl

    import medbench.data.cache as cache
    from medbench.data.base import DatasetIndex, label_column

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (10, 28, 28)).astype(np.uint8)
    table = pl.DataFrame({"sample_id": [str(i) for i in range(10)], "patient_id": [str(i) for i in range(10)],
                          label_column("y"): [i % 2 for i in range(10)]})
    index = DatasetIndex("big", table, ["y"], pixels=pixels)
    small = cache.build_cache(index, 32, 1)
    assert small.path is None
    monkeypatch.setattr(cache, "IN_MEMORY_LIMIT_BYTES", 1000)
    monkeypatch.setenv("MEDBENCH_CACHE", str(tmp_path))
    big = cache.build_cache(index, 32, 1)
    assert big.path is not None and big.path.is_file() and np.array_equal(np.asarray(big.pixels), small.pixels)
