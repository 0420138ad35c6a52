"""``medbench data download``: checksums, archive checks and atomic placement against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import SHARED_DATA, run_cli

from medbench.data.download import RemoteFile, download, download_files, write_manifest
from medbench.errors import DataError

NO_OFFLINE = {"MEDBENCH_OFFLINE": ""}


class _Quiet(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest output clean; remember what was asked
        _Quiet.requests.append(self.path)


@pytest.fixture()
def server(tmp_path: Path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Quiet.requests = []
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDBENCH_OFFLINE", raising=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.rglob("*") if ".part-" in p.name or ".download-" in p.name)


def test_file_with_right_checksum_is_placed_and_recorded(server, tmp_path: Path) -> None:
    base, www = server
    payload = b"medmnist-like payload " * 1000
    (www / "set.npz").write_bytes(payload)
    dest = tmp_path / "data" / "medmnist"
    rf = RemoteFile(f"{base}/set.npz", "set.npz", md5=hashlib.md5(payload).hexdigest(),
                    sha256=hashlib.sha256(payload).hexdigest())
    seen = []
    records = download_files([rf], dest, progress=lambda name, done, total: seen.append((done, total)))
    assert (dest / "set.npz").read_bytes() == payload
    assert records[0]["verified_by"] == "md5" and records[0]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert seen[-1] == (len(payload), len(payload))
    manifest = json.loads(write_manifest(dest, "medmnist", records).read_text())
    assert manifest["files"][0]["file"] == "set.npz" and manifest["files"][0]["bytes"] == len(payload)
    assert _leftovers(dest) == []
    # already there with the published checksum: not fetched again
    n = len(_Quiet.requests)
    again = download_files([rf], dest)
    assert again[0]["status"] == "already present" and len(_Quiet.requests) == n


def test_wrong_checksum_keeps_nothing(server, tmp_path: Path) -> None:
    base, www = server
    (www / "set.npz").write_bytes(b"tampered")
    dest = tmp_path / "data" / "medmnist"
    rf = RemoteFile(f"{base}/set.npz", "set.npz", md5="28209eda62fecd6e6a2d98b1501bb15f")
    with pytest.raises(DataError) as err:
        download_files([rf], dest)
    msg = str(err.value)
    assert msg.startswith(f"{base}/set.npz: checksum: checksum mismatch: expected md5 28209eda62fecd6e6a2d98b1501bb15f")
    assert f"got md5 {hashlib.md5(b'tampered').hexdigest()}" in msg and "\n" not in msg
    assert not (dest / "set.npz").exists() and _leftovers(dest) == []


def _tb_archive(path: Path, normal: int, tb: int, prefix: str = "MCUCXR", top: str = "MontgomerySet") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(normal + tb):
            stem = f"{prefix}_{i + 1:04d}_{0 if i < normal else 1}"
            z.writestr(f"{top}/CXR_png/{stem}.png", b"png")
            z.writestr(f"{top}/ClinicalReadings/{stem}.txt", "Patient's Sex: M\nPatient's Age: 040Y\nnormal\n")
            z.writestr(f"{top}/ManualMask/leftMask/{stem}.png", b"mask")
        z.writestr(f"__MACOSX/{top}/._junk", b"")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_archive_checked_against_published_counts_then_placed(server, tmp_path: Path) -> None:
    base, www = server
    _tb_archive(www / "NLM-MontgomeryCXRSet.zip", 80, 58)
    dest = tmp_path / "data" / "tuberculosis"
    records = download("tuberculosis", dest, subsets=["montgomery"], mirror=base)
    assert len(list((dest / "MontgomerySet" / "CXR_png").glob("MCUCXR_*.png"))) == 138
    assert not (dest / "__MACOSX").exists() and not (dest / "NLM-MontgomeryCXRSet.zip").exists()
    assert records[0]["verified_by"] == "content (published image counts)" and records[0]["placed"] == ["MontgomerySet"]
    assert json.loads((dest / "medbench-download.json").read_text())["dataset"] == "tuberculosis"
    assert _leftovers(dest) == []
    n = len(_Quiet.requests)
    again = download("tuberculosis", dest, subsets=["montgomery"], mirror=base)
    assert again[0]["status"] == "already present" and len(_Quiet.requests) == n  # not fetched again
    (dest / "ChinaSet_AllFiles").mkdir()  # a folder the next archive would create: refused before anything moves
    _tb_archive(www / "ChinaSet_AllFiles.zip", 1, 0, prefix="CHNCXR", top="ChinaSet_AllFiles")
    with pytest.raises(DataError, match="'ChinaSet_AllFiles' already exists; remove it to download again"):
        download_files([RemoteFile(f"{base}/ChinaSet_AllFiles.zip", "ChinaSet_AllFiles.zip", extract=True)], dest)
    assert list((dest / "ChinaSet_AllFiles").iterdir()) == [] and _leftovers(dest) == []


def test_archive_with_wrong_content_is_not_placed(server, tmp_path: Path) -> None:
    base, www = server
    _tb_archive(www / "NLM-MontgomeryCXRSet.zip", 80, 57)
    dest = tmp_path / "data" / "tuberculosis"
    with pytest.raises(DataError, match=r"holds 80 normal and 57 tuberculosis images .*NLM publishes 80 and 58"):
        download("tuberculosis", dest, subsets=["montgomery"], mirror=base)
    assert not (dest / "MontgomerySet").exists() and _leftovers(dest) == []


def test_archive_escaping_the_folder_is_refused(server, tmp_path: Path) -> None:
    base, www = server
    with zipfile.ZipFile(www / "evil.zip", "w") as z:
        z.writestr("../outside.txt", "x")
    dest = tmp_path / "data" / "x"
    with pytest.raises(DataError, match="would land outside the dataset folder"):
        download_files([RemoteFile(f"{base}/evil.zip", "evil.zip", extract=True)], dest)
    assert not (tmp_path / "data" / "outside.txt").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("env", "args", "fragment"), [
    (NO_OFFLINE, ["--mirror", f"http://127.0.0.1:{_closed_port()}"], "network: cannot reach 127.0.0.1:"),
    (NO_OFFLINE, ["--mirror", "https://medbench-mirror.invalid"], "cannot reach medbench-mirror.invalid:443"),
    ({"MEDBENCH_OFFLINE": "1"}, [], "offline (MEDBENCH_OFFLINE is set)"),
])
def test_no_network_fails_fast_with_one_line(env: dict, args: list[str], fragment: str, tmp_path: Path) -> None:
    proc = run_cli("data", "download", "medmnist", "--subset", "pneumoniamnist", "--data-root", str(tmp_path), *args,
                   env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "medmnist" / "pneumoniamnist.npz").exists()


def test_cli_rejects_a_file_that_is_not_the_published_one(server, tmp_path: Path) -> None:
    base, www = server
    shared = SHARED_DATA / "medmnist" / "pneumoniamnist.npz"  # a re-sampled variant: not Zenodo's bytes
    (www / "pneumoniamnist.npz").write_bytes(shared.read_bytes() if shared.is_file() else b"not the release")
    proc = run_cli("data", "download", "medmnist", "--subset", "pneumoniamnist", "--data-root", str(tmp_path),
                   "--mirror", base, env=NO_OFFLINE, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "checksum mismatch: expected md5 28209eda62fecd6e6a2d98b1501bb15f" in proc.stderr
    assert not (tmp_path / "medmnist" / "pneumoniamnist.npz").exists()


def test_credentialed_dataset_says_where_and_how(tmp_path: Path) -> None:
    proc = run_cli("data", "download", "vindr-mammo", "--data-root", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "https://physionet.org/content/vindr-mammo/1.0.0/" in proc.stderr
    assert "images/<study_id>/<image_id>.dicom" in proc.stderr
    listing = run_cli("data", "download")
    assert listing.returncode == 0 and "medmnist" in listing.stdout and "credentialed" in listing.stdout
    proc = run_cli("data", "download", "tuberculosis", "--size", "64", "--data-root", str(tmp_path))
    assert proc.returncode == 2 and "--size" in proc.stderr
