"""Decoding one image file into a numpy array, whatever the format.

PNG (8 and 16 bit), JPEG and other Pillow formats; DICOM through pydicom and
its pixel-data decoders: uncompressed and RLE natively, JPEG 2000 / JPEG-LS /
lossless JPEG through the pylibjpeg plugins medbench depends on (the error says
which package a missing decoder is in). Multi-frame DICOMs give their first
frame, rescale slope/intercept is applied and MONOCHROME1 is inverted so that
bright means dense. Every failure is a :class:`~medbench.errors.DataError`
naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medbench.errors import DataError

DICOM_SUFFIXES = {".dcm", ".dicom"}
#: bumped when decoding a file gives other pixels (a format's handling, rescaling, inversion, 8-bit
#: scaling in :func:`to_uint8`): part of the preprocessing cache key, so cached images are decoded again.
#: 2: JPEGs decoded at reduced scale in the DCT domain when the cache size allows (``reduce_to``)
DECODER_VERSION = 2


def read_image(path: Path, *, reduce_to: int | None = None) -> np.ndarray:
    """``[H, W]`` (grey) or ``[H, W, 3]`` (colour) array; dtype uint8, uint16 or float32.

    ``reduce_to``: the image will be reduced; a JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain (Pillow's ``draft``), the largest reduction keeping both sides at least ``reduce_to`` pixels
    (the preprocessing cache asks for twice its size: see :func:`medbench.data.cache.build_cache`). Other
    formats are decoded at full size.

    Decoders' warnings about a file (pydicom's "end of file reached", Pillow's
    truncated-file notes) are silenced: a file that decodes is used, one that
    does not raises a DataError naming it; either way nothing else reaches
    stderr, which would repeat per file over a large dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found", where=path)
    if path.stat().st_size == 0:
        raise DataError("image file is empty (0 bytes)", where=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix.lower() in DICOM_SUFFIXES or _looks_like_dicom(path):
            return _read_dicom(path)
        return _read_pillow(path, reduce_to)


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_pillow(path: Path, reduce_to: int | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if reduce_to and im.format == "JPEG":
                im.draft(im.mode, (reduce_to, reduce_to))  # never below reduce_to on either side
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(im, dtype=np.uint16)
            elif im.mode == "I":
                arr = np.asarray(im, dtype=np.int32)
                arr = np.clip(arr, 0, 65535).astype(np.uint16)
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float32)
            elif im.mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif im.mode in ("LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "1"):
                target = "L" if im.mode in ("LA", "1") else "RGB"
                arr = np.asarray(im.convert(target))
            else:
                arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError as err:
        raise DataError("not a readable image (unknown or corrupt format)", where=path) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt or truncated image: {err}", where=path) from err
    return np.ascontiguousarray(arr)


# the decoder package pydicom needs for each family of compressed transfer syntaxes
_DECODER_HINT = {
    "JPEG 2000": "pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg-libjpeg",
    "JPEG Lossless": "pylibjpeg-libjpeg",
    "JPEG Extended": "pylibjpeg-libjpeg",
    "JPEG Baseline": "pylibjpeg-libjpeg",
    "RLE": "pylibjpeg-rle",
}


def _decoder_hint(syntax_name: str) -> str:
    for key, package in _DECODER_HINT.items():
        if key.lower() in syntax_name.lower():
            return f"pip install pylibjpeg {package}"
    return "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as err:  # pragma: no cover - pydicom is a dependency
        raise DataError("reading DICOM needs pydicom (pip install pydicom)", where=path) from err
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            if path.suffix.lower() not in DICOM_SUFFIXES:
                raise
            ds = pydicom.dcmread(path, force=True)  # a .dcm/.dicom file written without the 128-byte preamble
    except InvalidDicomError as err:
        raise DataError("not a valid DICOM file", where=path) from err
    except Exception as err:
        raise DataError(f"corrupt DICOM file: {err}", where=path) from err
    if "PixelData" not in ds:
        raise DataError("DICOM file holds no image (no PixelData element)", where=path, field="PixelData")
    try:
        arr = ds.pixel_array
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = str(getattr(syntax, "name", syntax))
        raise DataError(
            f"cannot decode DICOM pixel data (transfer syntax {name}): {str(err).splitlines()[0] if str(err) else err}; "
            f"if a decoder is missing: {_decoder_hint(name)}",
            where=path,
            field="PixelData",
        ) from err
    arr = np.asarray(arr)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # multi-frame: the first frame
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        arr = arr.astype(np.float32) * slope + intercept
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = arr.max() - arr  # display convention: bright = dense
    if arr.dtype not in (np.uint8, np.uint16, np.float32):
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any image to uint8: 8-bit passes through, wider types are min-max scaled per image:
    ``round((a - min) * (255 / (max - min)))`` in float32.

    16-bit images (PNG, DICOM) go through a lookup table of that same float32 expression for every value
    between min and max: the same bytes, without float32 copies of a 12-megapixel image."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        lo, hi = int(arr.min()), int(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, dtype=np.uint8)
        values = np.clip(np.arange(65536, dtype=np.float32), lo, hi)  # only lo..hi occur
        table = np.round((values - float(lo)) * (255.0 / float(hi - lo))).astype(np.uint8)
        return table[arr]
    a = arr.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
