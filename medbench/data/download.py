"""``medbench data download NAME``: fetch the datasets whose terms allow it, verified, placed atomically.

Downloadable (open URLs):

* ``medmnist``: any of the 12 MedMNIST 2D sets, any size, from Zenodo, each file
  checked against the MD5 MedMNIST publishes;
* ``tuberculosis``: the NLM Montgomery and Shenzhen archives (NLM publishes no
  checksums: the extracted archive must hold exactly the published numbers of
  images per class, 80 + 58 and 326 + 336, before it is placed);
* ``isic``: the ISIC 2019 training images and CSVs (no published checksums: the
  archive must hold the 25,331 images the ground-truth CSV lists).

Every downloaded file's SHA-256 and MD5 are recorded in
``<dataset>/medbench-download.json`` so copies can be compared later. A file is
streamed to a temporary name beside its destination and only renamed into place
once verified; an archive is extracted and checked in a temporary folder, then
its top-level folders are renamed into the dataset folder. Nothing half-done is
ever left where an adapter would read it.

Other datasets need an account, a data-use agreement or a dedicated client; for
them the command prints the official page and the layout medbench expects.

Without network the command fails within seconds: the publisher's host is probed
(a TCP connection, DNS included, at most a few seconds) before anything else;
``MEDBENCH_OFFLINE=1`` fails at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from medbench.errors import DataError, UsageError
from medbench.utils import atomic_write_json

PROBE_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 60.0
CHUNK = 1 << 20
MANIFEST = "medbench-download.json"

Progress = Callable[[str, int, int | None], None]  # (file name, bytes so far, total or None)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a download: where it comes from, its published checksum, what to do with it."""

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    #: a zip archive whose content goes into the dataset folder (the archive itself is not kept)
    extract: bool = False
    #: the top-level folders the archive yields: when all exist, the archive is not fetched again
    provides: tuple[str, ...] = ()


@dataclass(frozen=True)
class DownloadSource:
    name: str
    title: str
    page: str
    license: str
    #: "open" (medbench downloads it) or what stands in the way ("credentialed", "account", "client")
    access: str
    layout: str
    #: subset names -> files; empty for datasets medbench does not download
    subsets: dict[str, Callable[[int], list[RemoteFile]]] = field(default_factory=dict)
    #: checks an extracted archive before placement (publishers without checksums); raises DataError
    verify: Callable[[str, Path], None] | None = None
    sizes: tuple[int, ...] = ()

    @property
    def downloadable(self) -> bool:
        return bool(self.subsets)

    def not_downloadable_message(self) -> str:
        return (f"{self.name} cannot be downloaded by medbench ({self.access}): get it from {self.page} "
                f"({self.license}); expected layout: {self.layout}")


# --------------------------------------------------------------------------- the sources


def _medmnist_subsets() -> dict[str, Callable[[int], list[RemoteFile]]]:
    from medbench.data.medmnist_info import SETS

    def files(flag: str) -> Callable[[int], list[RemoteFile]]:
        s = SETS[flag]
        return lambda size: [RemoteFile(s.url(size), s.filename(size), md5=s.md5[size])]

    return {flag: files(flag) for flag in SETS}


NLM_TB = {
    "montgomery": ("https://openi.nlm.nih.gov/imgs/collections/NLM-MontgomeryCXRSet.zip", "MCUCXR", (80, 58),
                   "MontgomerySet"),
    "shenzhen": ("https://openi.nlm.nih.gov/imgs/collections/ChinaSet_AllFiles.zip", "CHNCXR", (326, 336),
                 "ChinaSet_AllFiles"),
}


def _verify_tb(subset: str, folder: Path) -> None:
    from medbench.data.adapters.tuberculosis import discover

    _, prefix, (normal, tb), _ = NLM_TB[subset]
    images = [stem for stem, f in discover(folder).items() if "png" in f and stem.startswith(prefix)]
    got = (sum(s.endswith("_0") for s in images), sum(s.endswith("_1") for s in images))
    if got != (normal, tb):
        raise DataError(f"the {subset} archive holds {got[0]} normal and {got[1]} tuberculosis images "
                        f"({prefix}_####_{{0,1}}.png); NLM publishes {normal} and {tb}", where=NLM_TB[subset][0])


ISIC_2019 = "https://isic-challenge-data.s3.amazonaws.com/2019"


def _verify_isic(subset: str, folder: Path) -> None:
    jpgs = sum(1 for _ in folder.rglob("*.jpg"))
    if jpgs != 25331:
        raise DataError(f"the ISIC 2019 training archive holds {jpgs} images; ISIC publishes 25,331",
                        where=f"{ISIC_2019}/ISIC_2019_Training_Input.zip")


def _registry() -> dict[str, DownloadSource]:
    sources = [
        DownloadSource(
            "medmnist", "MedMNIST v3 2D sets", "https://zenodo.org/records/10519652", "CC BY 4.0 (DermaMNIST CC BY-NC)",
            "open", "medmnist/<flag>.npz (28 px) or medmnist/<flag>_<64|128|224>.npz",
            subsets=_medmnist_subsets(), sizes=(28, 64, 128, 224)),
        DownloadSource(
            "tuberculosis", "NLM Montgomery + Shenzhen tuberculosis chest X-rays",
            "https://lhncbc.nlm.nih.gov/LHC-publications/pubs/TuberculosisChestXrayImageDataSets.html",
            "NLM terms: research use, cite Jaeger et al. 2014", "open",
            "tuberculosis/MontgomerySet/{CXR_png,ClinicalReadings}/ and tuberculosis/ChinaSet_AllFiles/"
            "{CXR_png,ClinicalReadings}/",
            subsets={k: (lambda size, k=k: [RemoteFile(NLM_TB[k][0], Path(urlparse(NLM_TB[k][0]).path).name,
                                                       extract=True, provides=(NLM_TB[k][3],))]) for k in NLM_TB},
            verify=_verify_tb),
        DownloadSource(
            "isic", "ISIC 2019 training set", "https://challenge.isic-archive.com/data/#2019", "CC BY-NC", "open",
            "isic/ISIC_2019_Training_GroundTruth.csv, isic/ISIC_2019_Training_Metadata.csv, "
            "isic/ISIC_2019_Training_Input/*.jpg",
            subsets={"2019": lambda size: [
                RemoteFile(f"{ISIC_2019}/ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_GroundTruth.csv"),
                RemoteFile(f"{ISIC_2019}/ISIC_2019_Training_Metadata.csv", "ISIC_2019_Training_Metadata.csv"),
                RemoteFile(f"{ISIC_2019}/ISIC_2019_Training_Input.zip", "ISIC_2019_Training_Input.zip", extract=True,
                           provides=("ISIC_2019_Training_Input",)),
            ]},
            verify=_verify_isic),
        DownloadSource(
            "ham10000", "HAM10000", "https://doi.org/10.7910/DVN/DBW86T", "CC BY-NC-SA 4.0",
            "Harvard Dataverse download with terms of use",
            "ham10000/HAM10000_metadata.csv, ham10000/HAM10000_images_part_1/*.jpg, "
            "ham10000/HAM10000_images_part_2/*.jpg"),
        DownloadSource(
            "covidx", "COVIDx CXR", "https://www.kaggle.com/datasets/andyczhao/covidx-cxr2", "per source dataset",
            "Kaggle account",
            "covidx/train.txt, covidx/test.txt ('patient_id filename label data_source'), covidx/train/, covidx/test/"),
        DownloadSource(
            "cbis-ddsm", "CBIS-DDSM", "https://www.cancerimagingarchive.net/collection/cbis-ddsm/", "CC BY 3.0",
            "TCIA's NBIA Data Retriever",
            "cbis-ddsm/{mass,calc}_case_description_{train,test}_set.csv, cbis-ddsm/CBIS-DDSM/<series>/.../1-1.dcm"),
        DownloadSource(
            "vindr-mammo", "VinDr-Mammo", "https://physionet.org/content/vindr-mammo/1.0.0/",
            "PhysioNet Restricted Health Data License 1.5.0", "PhysioNet credentialed access",
            "vindr-mammo/breast-level_annotations.csv, vindr-mammo/images/<study_id>/<image_id>.dicom"),
    ]
    return {s.name: s for s in sources}


def sources() -> dict[str, DownloadSource]:
    return _registry()


def source_for(name: str) -> DownloadSource:
    """The download source of dataset ``name``; datasets of other adapters get a message-only source."""
    reg = _registry()
    if name in reg:
        return reg[name]
    from medbench.data.base import get_adapter, list_adapters

    if name in list_adapters() and name not in ("synthetic", "csv"):
        adapter = get_adapter(name)
        return DownloadSource(name, adapter.description, adapter.how_to_get, "see the official page",
                              "not an open download", adapter.how_to_get)
    from medbench.utils import did_you_mean

    known = sorted(set(reg) | (set(list_adapters()) - {"synthetic", "csv"}))
    raise UsageError(f"unknown dataset {name!r}{did_you_mean(name, known)}; expected one of: {', '.join(known)}",
                     field="NAME")


# --------------------------------------------------------------------------- network


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def check_reachable(url: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail fast, naming the host, when ``url``'s host does not accept a TCP connection in ``timeout`` s."""
    if _truthy(os.environ.get("MEDBENCH_OFFLINE")):
        raise DataError(f"offline (MEDBENCH_OFFLINE is set): cannot download {url}", field="network")
    parsed = urlparse(url)
    host = parsed.hostname
    if parsed.scheme not in ("http", "https") or not host:
        raise UsageError(f"not an http(s) URL: {url!r}", field="url")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as err:
            outcome.append(err)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)  # getaddrinfo has no timeout of its own
    if not outcome or outcome[0] is not None:
        why = "no answer" if not outcome else (getattr(outcome[0], "strerror", None) or str(outcome[0]))
        raise DataError(f"cannot reach {host}:{port} within {timeout:g} s ({why}); check the network or use --mirror",
                        where=url, field="network")


# --------------------------------------------------------------------------- files


def file_digests(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def _matches(rf: RemoteFile, md5: str, sha: str) -> bool:
    return (rf.md5 is None or rf.md5.lower() == md5) and (rf.sha256 is None or rf.sha256.lower() == sha)


def fetch(rf: RemoteFile, dest: Path, *, progress: Progress | None = None,
          timeout: float = READ_TIMEOUT_SECONDS) -> dict:
    """Stream ``rf.url`` to ``dest`` (a temporary name beside it, renamed once the checksum is right).

    Returns the record of the file (url, size, md5, sha256, verified_by).
    """
    import urllib.error
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    try:
        request = urllib.request.Request(rf.url, headers={"User-Agent": "medbench"})
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(part, "wb") as out:
            total = resp.headers.get("Content-Length")
            total_n = int(total) if total and total.isdigit() else None
            while block := resp.read(CHUNK):
                out.write(block)
                md5.update(block)
                sha.update(block)
                size += len(block)
                if progress:
                    progress(rf.filename, size, total_n)
            out.flush()
            os.fsync(out.fileno())
        if total_n is not None and size != total_n:
            raise DataError(f"download ended after {size} of {total_n} bytes", where=rf.url, field="network")
        got_md5, got_sha = md5.hexdigest(), sha.hexdigest()
        if not _matches(rf, got_md5, got_sha):
            expected = f"md5 {rf.md5}" if rf.md5 else f"sha256 {rf.sha256}"
            got = f"md5 {got_md5}" if rf.md5 else f"sha256 {got_sha}"
            raise DataError(f"checksum mismatch: expected {expected}, got {got}; the file was not kept",
                            where=rf.url, field="checksum")
        os.replace(part, dest)
    except urllib.error.HTTPError as err:
        raise DataError(f"HTTP {err.code} {err.reason}", where=rf.url, field="network") from err
    except urllib.error.URLError as err:
        raise DataError(f"download failed: {err.reason}", where=rf.url, field="network") from err
    except (TimeoutError, socket.timeout) as err:
        raise DataError(f"no data for {timeout:g} s", where=rf.url, field="network") from err
    except OSError as err:  # connection reset, disk full, ...
        raise DataError(f"download failed: {err.strerror or err}", where=rf.url, field="network") from err
    finally:
        part.unlink(missing_ok=True)
    verified = "md5" if rf.md5 else ("sha256" if rf.sha256 else None)
    return {"url": rf.url, "file": rf.filename, "bytes": size, "md5": got_md5, "sha256": got_sha,
            "verified_by": verified}


def _safe_extract(archive: Path, into: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                target = (into / info.filename).resolve()
                if not str(target).startswith(str(into.resolve()) + os.sep) and target != into.resolve():
                    raise DataError(f"archive member {info.filename!r} would land outside the dataset folder",
                                    where=archive)
            z.extractall(into)
    except zipfile.BadZipFile as err:
        raise DataError(f"not a valid zip archive: {err}", where=archive) from err


def place_tree(staging: Path, dest: Path) -> list[str]:
    """Move every top-level entry of ``staging`` into ``dest`` with one rename each (atomic per entry).

    An entry that already exists in ``dest`` is an error, checked before anything moves.
    """
    entries = sorted(p for p in staging.iterdir() if p.name != "__MACOSX")
    clash = [p.name for p in entries if (dest / p.name).exists()]
    if clash:
        raise DataError(f"{clash[0]!r} already exists; remove it to download again", where=dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in entries:
        os.replace(p, dest / p.name)
    return [p.name for p in entries]


def download_files(files: list[RemoteFile], dest: Path, *, subset: str = "", verify: Callable[[str, Path], None]
                   | None = None, progress: Progress | None = None, timeout: float = READ_TIMEOUT_SECONDS,
                   probe: bool = True) -> list[dict]:
    """Download ``files`` into the dataset folder ``dest``; returns the manifest records.

    A plain file already present with the published checksum is not fetched again.
    """
    records = []
    staging_root = dest.parent / f".{dest.name}.download-{os.getpid()}"
    try:
        for rf in files:
            target = dest / rf.filename
            if not rf.extract and target.is_file() and (rf.md5 or rf.sha256):
                md5, sha = file_digests(target)
                if _matches(rf, md5, sha):
                    records.append({"url": rf.url, "file": rf.filename, "bytes": target.stat().st_size, "md5": md5,
                                    "sha256": sha, "verified_by": "md5" if rf.md5 else "sha256",
                                    "status": "already present"})
                    continue
            if rf.extract and rf.provides and all((dest / p).exists() for p in rf.provides):
                records.append({"url": rf.url, "file": rf.filename, "bytes": 0, "md5": None, "sha256": None,
                                "verified_by": None, "status": "already present", "placed": list(rf.provides)})
                continue
            if probe:
                check_reachable(rf.url)
            if not rf.extract:
                records.append(fetch(rf, target, progress=progress, timeout=timeout))
                continue
            staging = staging_root / "extract"
            archive = staging_root / rf.filename
            staging.mkdir(parents=True, exist_ok=True)
            record = fetch(rf, archive, progress=progress, timeout=timeout)
            _safe_extract(archive, staging)
            archive.unlink()
            if verify is not None:
                verify(subset, staging)
                record["verified_by"] = record["verified_by"] or "content (published image counts)"
            record["placed"] = place_tree(staging, dest)
            shutil.rmtree(staging, ignore_errors=True)
            records.append(record)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return records


def write_manifest(dest: Path, name: str, records: list[dict]) -> Path:
    from medbench.errors import DataError
    from medbench.utils import read_json

    path = dest / MANIFEST
    previous = read_json(path, error=DataError, expected="the download manifest medbench wrote").get("files", []) \
        if path.is_file() else []
    by_file = {r["file"]: r for r in previous}
    by_file.update({r["file"]: r for r in records})
    atomic_write_json(path, {"dataset": name, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "files": sorted(by_file.values(), key=lambda r: r["file"])})
    return path


def download(name: str, dest: Path, *, subsets: list[str] | None = None, size: int | None = None,
             mirror: str | None = None, progress: Progress | None = None) -> list[dict]:
    """Download dataset ``name`` (all subsets unless some are named) into ``dest``."""
    source = source_for(name)
    if not source.downloadable:
        raise DataError(source.not_downloadable_message(), field="NAME")
    chosen = subsets or list(source.subsets)
    unknown = [s for s in chosen if s not in source.subsets]
    if unknown:
        from medbench.utils import did_you_mean

        raise UsageError(f"{name} has no subset {unknown[0]!r}{did_you_mean(unknown[0], list(source.subsets))}; "
                         f"expected one of: {', '.join(source.subsets)}", field="--subset")
    if size is not None and size not in (source.sizes or ()):
        raise UsageError(f"{name} comes in sizes {list(source.sizes) or 'of one kind only'}, not {size}",
                         field="--size")
    records = []
    for subset in chosen:
        files = source.subsets[subset](size or (source.sizes[0] if source.sizes else 0))
        if mirror:
            files = [RemoteFile(mirror.rstrip("/") + "/" + f.filename, f.filename, f.md5, f.sha256, f.extract,
                                f.provides) for f in files]
        records += download_files(files, dest, subset=subset, verify=source.verify, progress=progress)
        write_manifest(dest, name, records)
    return records


# --------------------------------------------------------------------------- the command


def download_command(name: str | None, *, data_root: Path | None, data: list[str], subsets: list[str],
                     size: int | None, mirror: str | None, console) -> None:
    """What ``medbench data download`` does: list the datasets, or download one into its folder."""
    import sys

    from rich.table import Table

    from medbench.data.locate import DataLocations, env_name

    if name is None:
        table = Table(title="datasets (medbench data download NAME)")
        for col in ("name", "access", "license", "subsets", "official page"):
            table.add_column(col)
        for s in sources().values():
            table.add_row(s.name, s.access, s.license, ", ".join(s.subsets) or "-", s.page)
        from medbench.data.base import list_adapters

        for other in list_adapters():  # datasets of adapters without a download entry: where to get them
            if other not in sources() and other not in ("synthetic", "csv"):
                s = source_for(other)
                table.add_row(s.name, s.access, "-", "-", s.page)
        console.print(table)
        return
    source = source_for(name)
    if not source.downloadable:
        raise DataError(source.not_downloadable_message(), field="NAME")
    dest, how = DataLocations.from_cli(data_root, data).resolve(name)
    if dest is None:
        raise UsageError(f"where should {name} go? pass --data-root DIR (it lands in DIR/{name}), --data {name}=PATH "
                         f"or set {env_name(name)}", field="--data-root")
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    bars: dict[str, int] = {}
    show = sys.stderr.isatty() or bool(os.environ.get("MEDBENCH_PROGRESS"))
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=not show, transient=False) as bar:
        def progress(filename: str, done: int, total: int | None) -> None:
            if filename not in bars:
                bars[filename] = bar.add_task(filename, total=total)
            bar.update(bars[filename], completed=done)

        records = download(name, dest, subsets=subsets or None, size=size, mirror=mirror, progress=progress)
    for r in records:
        check = r.get("verified_by") or "unverified"
        state = r.get("status", "downloaded")
        if r.get("sha256"):
            console.print(f"{state}: {r['file']} ({r['bytes']:,} bytes, {check} ok, sha256 {r['sha256'][:16]}...)")
        else:
            console.print(f"{state}: {', '.join(r.get('placed', [r['file']]))}")
    console.print(f"{name}: {dest} (from {how}); manifest {dest / MANIFEST}")
