"""What the image-content check costs (pytest-benchmark): stamping every image file of a dataset.

``stat`` (the default: size + mtime per file) against ``content`` (``--verify-pixels``: sha256 of every
file), each in one thread and in the thread pool large datasets use, on the real NIH sample (1000 PNGs)
when ../shared/data is present, otherwise 1000 generated 64 x 64 PNGs. Page cache warm (the files were
just listed or read), as on a rerun.

    PYTHONPATH=. python -m pytest benchmarks/test_pixel_stamps_bench.py --benchmark-only -s
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medbench.data.fingerprint import file_stamps


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    shared = Path(os.environ.get("MEDBENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    real = shared / "nih-cxr-1000"
    if (real / "images").is_dir():
        return real, sorted(f"images/{p}" for p in os.listdir(real / "images"))
    from PIL import Image

    root = tmp_path_factory.mktemp("stamps")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(1000):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i:04d}.png")
    return root, sorted(f"images/{p}" for p in os.listdir(root / "images"))


@pytest.mark.parametrize("mode,workers", [("stat", 1), ("stat", 8), ("content", 1), ("content", 8)])
def test_stamp_every_file(benchmark, files, mode: str, workers: int) -> None:
    root, paths = files
    kwargs = {"workers": workers, "threaded_from": 0}  # 8 workers: the pool, whatever the file count
    file_stamps(root, paths, mode, **kwargs)  # warm the page cache
    stamps = benchmark.pedantic(file_stamps, args=(root, paths, mode), kwargs=kwargs, rounds=10, iterations=1)
    assert len(stamps) == len(paths) and "absent" not in stamps
    benchmark.extra_info.update({"files": len(paths), "bytes": sum((root / p).stat().st_size for p in paths),
                                 "load_average": os.getloadavg()[0]})
