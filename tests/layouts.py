"""Files written in the exact layouts publishers ship, quirks included, for adapter tests.

Every writer documents the quirk it reproduces. Images are tiny; what matters is
names, folders, headers, encodings and the odd cells real copies contain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    im.save(path)
    return path


def grey(rng: np.random.Generator, size: int = 24, bright: float = 0.0) -> np.ndarray:
    return np.clip(rng.random((size, size)) * 200 + bright, 0, 255).astype(np.uint8)


def png16(path: Path, arr16: np.ndarray) -> Path:
    """A 16-bit greyscale PNG (PadChest, some TB copies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr16.astype(np.uint16)).save(path)
    return path


def palette_png(path: Path, arr: np.ndarray) -> Path:
    """Shenzhen's CXR_png are palette ('P') images (a few are RGB with R == G == B)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert("P").save(path)
    return path


def dicom(path: Path, arr: np.ndarray, *, syntax: str = "explicit", photometric: str = "MONOCHROME2",
          preamble: bool = True, frames: int = 1, attrs: dict | None = None) -> Path:
    """A DICOM file; ``syntax``: explicit (uncompressed), rle or j2k (JPEG 2000 lossless)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        generate_uid,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    if frames > 1:
        arr = np.stack([arr] + [arr // (k + 2) for k in range(frames - 1)])
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = 16 if arr.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for k, v in (attrs or {}).items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    if syntax == "rle":
        ds.compress(RLELossless)
    elif syntax == "j2k":
        ds.compress(JPEG2000Lossless)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        pydicom.dcmwrite(path, ds, enforce_file_format=False)
        raw = path.read_bytes()  # strip the 128-byte preamble + "DICM": a bare data set, as some exporters write
        if raw[128:132] == b"DICM":
            path.write_bytes(raw[132:])
    return path


# --------------------------------------------------------------------------- CBIS-DDSM description CSVs
# The official headers: the mass files say "breast_density", the calc files "breast density".
MASS_HEADER = ("patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,mass shape,"
               "mass margins,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path")
CALC_HEADER = ("patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,calc type,"
               "calc distribution,assessment,pathology,subtlety,image file path,cropped image file path,"
               "ROI mask file path")
UID = "1.3.6.1.4.1.9590.100.1.2.{}"


def cbis_row(kind: str, split: str, patient: str, side: str, view: str, abn: int, pathology: str) -> str:
    series = f"{kind.capitalize()}-{'Training' if split == 'train' else 'Test'}_{patient}_{side}_{view}"
    image = f"{series}/{UID.format(abn * 11)}/{UID.format(abn * 13)}/000000.dcm"
    roi = f'"{series}_{abn}/{UID.format(abn * 17)}/{UID.format(abn * 19)}/000001.dcm\n"'  # stray newline in quotes
    extra = "OVAL,CIRCUMSCRIBED" if kind == "mass" else "PLEOMORPHIC,CLUSTERED"
    return f"{patient},3,{side},{view},{abn},{kind},{extra},4,{pathology},3,{image},{image},{roi}"


def cbis_row_for_series(series: str, pathology: str, abn: int = 1) -> str:
    """A description row for a series folder name such as ``Mass-Test_P_00173_LEFT_CC``."""
    kind_split, p, number, side, view = series.split("_")
    kind, split = kind_split.split("-")
    return cbis_row(kind.lower(), "train" if split == "Training" else "test", f"{p}_{number}", side, view, abn,
                    pathology)
