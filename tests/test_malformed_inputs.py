"""A corpus of malformed inputs (task specs, suites, CSVs, images, DICOMs, command-line arguments).

Each one must give exit code 2 and exactly one line on stderr that names the
file (when there is one), the field, and what was expected; never a
traceback. Everything fails before training, so the corpus runs in-process
through ``medbench.cli.main`` and stays fast.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

BASE = """\
version: 1
family: tb
dataset: {name: smoke, adapter: synthetic, options: {family: tb, n_patients: 40, image_size: 16}}
type: binary
labels: [tuberculosis]
input: {resize: 16, crop: 12, channels: 1}
hyperrule: {batch_size: 8, schedule: [1, 2, 3, 4, 5]}
metrics: [auc, accuracy]
headline: auc
"""

CSV_TASK = """\
task: x
version: 1
family: corpus
dataset: {name: corpus, adapter: corpus-csv, options: %s}
type: binary
labels: [tuberculosis]
splits: {fractions: {train: 0.5, val: 0.25, test: 0.25}}
input: {resize: 16, crop: 12, channels: 1}
hyperrule: {batch_size: 4, schedule: [1, 2, 3, 4, 5]}
"""

GOOD_ROWS = [(f"img{i}.png", f"p{i}", str(i % 2)) for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def corpus_adapter():
    """Make the test-only ``corpus-csv`` adapter visible (in this process only)."""
    import medbench.data.adapters as pkg

    folder = str(Path(__file__).parent / "corpus_adapters")
    pkg.__path__.append(folder)
    yield
    pkg.__path__.remove(folder)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each case its own preprocessing cache (cases share file names, so they would share cache entries),
    and the thread count restored (``run --threads`` sets it in this process)."""
    import torch

    monkeypatch.setenv("MEDBENCH_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def png_bytes(value: int = 100, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_csv(path: Path, rows: list[tuple], header: str = "file,patient,label") -> None:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))


def corpus_dataset(tmp: Path, rows: list[tuple] | None = None, options: str = "{}") -> tuple[Path, Path]:
    """(tasks folder, dataset root) of a valid corpus-csv task ``x``; cases then break one thing."""
    tasks, root = tmp / "tasks", tmp / "data"
    (root / "images").mkdir(parents=True)
    tasks.mkdir()
    rows = GOOD_ROWS if rows is None else rows
    write_csv(root / "labels.csv", rows)
    for name, *_ in rows:
        if name.endswith(".png") and "/" not in name:
            (root / "images" / name).write_bytes(png_bytes(40 + 20 * int(name[3:-4] or 0)))
    (tasks / "x.yaml").write_text(CSV_TASK % options)
    return tasks, root


def run_args(tasks: Path, tmp: Path, *extra: str, task: str = "x") -> list[str]:
    return ["run", "-b", "cbr-tiny", "--task", task, "--tasks-dir", str(tasks), "--out", str(tmp / "out"),
            "--threads", "1", *extra]


# ---------------------------------------------------------------------------------------------- specs

def spec(files: dict[str, str], *extra: str, task: str = "x", suite: str | None = None) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        tasks = tmp / "tasks"
        tasks.mkdir()
        (tasks / "_base.yaml").write_text(BASE)
        for name, text in files.items():
            target = tasks / name
            target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
        if suite:
            return ["run", "-b", "cbr-tiny", "--suite", suite, "--tasks-dir", str(tasks), "--out", str(tmp / "out"),
                    "--threads", "1", *extra]
        return run_args(tasks, tmp, *extra, task=task)

    return setup


def x(body: str) -> dict[str, str]:
    return {"x.yaml": "task: x\ninclude: _base.yaml\n" + body}


SPECS = {
    "unknown-key": (spec(x("labelz: [a]\n")), ["x.yaml", ": labelz: ", "did you mean 'labels'"]),
    "unknown-nested-key": (spec(x("hyperrule: {batchsize: 8}\n")), ["x.yaml", "hyperrule.batchsize", "unknown field"]),
    "wrong-type-int": (spec(x("hyperrule: {batch_size: many}\n")), ["x.yaml", "hyperrule.batch_size", "integer"]),
    "wrong-type-list": (spec(x("labels: tuberculosis\n")), ["x.yaml", ": labels: ", "list"]),
    "wrong-type-mapping": (spec(x("input: 224\n")), ["x.yaml", ": input: ", "dictionary"]),
    "bad-enum": (spec(x("type: regression\n")), ["x.yaml", ": type: ", "'binary'"]),
    "missing-field": (spec({"x.yaml": "task: x\nversion: 1\nfamily: f\ntype: binary\n"
                                      "dataset: {name: smoke, adapter: synthetic}\n"}),
                      ["x.yaml", ": labels: ", "required field is missing"]),
    "missing-version": (spec({"x.yaml": BASE.replace("version: 1\n", "") + "task: x\n"}),
                        ["x.yaml", ": version: ", "required"]),
    "missing-include": (spec({"x.yaml": "task: x\ninclude: nope.yaml\n"}),
                        ["x.yaml", ": include: ", "included file not found", "nope.yaml"]),
    "include-cycle": (spec({"_a.yaml": "include: _b.yaml\n", "_b.yaml": "include: _a.yaml\n",
                            "x.yaml": "task: x\ninclude: _a.yaml\n"}),
                      ["x.yaml", ": include: ", "include cycle: x.yaml -> _a.yaml -> _b.yaml -> _a.yaml"]),
    "include-not-a-name": (spec({"x.yaml": "task: x\ninclude: 3\n"}), ["x.yaml", ": include: ", "file name"]),
    "yaml-syntax": (spec({"x.yaml": "task: x\nlabels: [a\nfamily: f\n"}), ["x.yaml", "line", "invalid YAML"]),
    "yaml-python-tag": (spec({"x.yaml": "task: x\nlabels: !!python/object/apply:os.system ['echo pwned']\n"}),
                        ["x.yaml", "invalid YAML", "constructor"]),
    "empty-file": (spec({"x.yaml": ""}), ["x.yaml", "expected a mapping"]),
    "top-level-list": (spec({"x.yaml": "- task\n- x\n"}), ["x.yaml", "expected a mapping"]),
    "not-utf8": (spec({"x.yaml": b"task: x\nfamily: \xff\xfe\n"}), ["x.yaml", "not UTF-8"]),
    "no-task-or-suite": (spec({"x.yaml": "family: f\n"}), ["x.yaml", ": task: ", "neither 'task:' nor 'suite:'"]),
    "name-not-a-string": (spec({"x.yaml": "task: [x]\n"}), ["x.yaml", ": task: ", "expected a name"]),
    "duplicate-task": (spec({**x(""), "y.yaml": "task: x\ninclude: _base.yaml\n"}),
                       ["y.yaml", ": task: ", "also defined in", "x.yaml"]),
    "bad-task-name": (spec({"x.yaml": "task: X Y\ninclude: _base.yaml\n"}, task="X Y"), ["x.yaml", ": task: ", "pattern"]),
    "fractions-sum": (spec(x("splits: {fractions: {train: 0.5, test: 0.2}}\n")),
                      ["x.yaml", "splits.fractions", "sum to 1"]),
    "crop-exceeds-resize": (spec(x("input: {resize: 16, crop: 32}\n")), ["x.yaml", ": input: ", "must not exceed"]),
    "headline-not-a-metric": (spec(x("headline: f1\n")), ["x.yaml", "headline 'f1' must be one of metrics"]),
    "unknown-metric": (spec(x("metrics: [auc, f1]\n")), ["x.yaml", ": metrics: ", "unknown metric 'f1'"]),
    "unknown-adapter": (spec(x("dataset: {adapter: syntetic}\n")),
                        ["x.yaml", "dataset.adapter", "did you mean 'synthetic'"]),
    "bad-adapter-option": (spec(x("dataset: {options: {family: xray}}\n")),
                           ["x.yaml", "dataset.options.family", "'cxr'"]),
    "adapter-label-mismatch": (spec(x("labels: [tb]\n")), ["x.yaml", ": labels: ", "has labels ['tuberculosis']"]),
    "binary-two-labels": (spec(x("labels: [a, b]\n")), ["x.yaml", "exactly one label"]),
    "negative-lr": (spec(x("hyperrule: {base_lr: -1}\n")), ["x.yaml", "hyperrule.base_lr", "greater than 0"]),
    "bad-schedule": (spec(x("hyperrule: {schedule: [5, 4, 3, 2, 1]}\n")),
                     ["x.yaml", "hyperrule.schedule", "5 increasing step counts"]),
    "bad-on-bad-image": (spec(x("dataset: {on_bad_image: maybe}\n")), ["x.yaml", "dataset.on_bad_image", "'skip'"]),
    "bad-bins": (spec(x("attributes: [{name: age_group, column: age, bins: [65, 40]}]\n")),
                 ["x.yaml", "attributes.0.bins", "increasing edges"]),
    "unknown-ood-task": (spec(x("ood: [{task: nope}]\n")), ["x.yaml", ": ood.task: ", "unknown OOD target task 'nope'"]),
    "bad-ood-label-map": (spec({**x("ood: [{task: y, label_map: {tuberculosis: covid}}]\n"),
                                "y.yaml": "task: y\ninclude: _base.yaml\n"}),
                          ["x.yaml", ": ood.label_map: ", "names a label the tasks do not have"]),
    "suite-unknown-task": (spec({"s.yaml": "suite: s\ntasks: [nope]\n"}, suite="s"),
                           ["s.yaml", ": tasks: ", "unknown task 'nope'"]),
    "suite-cycle": (spec({"s.yaml": "suite: s\nsuites: [t]\n", "t.yaml": "suite: t\nsuites: [s]\n"}, suite="s"),
                    ["s.yaml", ": suites: ", "suite cycle: s -> t -> s"]),
    "suite-unknown-key": (spec({"s.yaml": "suite: s\ntaks: [x]\n"}, suite="s"),
                          ["s.yaml", ": taks: ", "did you mean 'tasks'"]),
}


# ---------------------------------------------------------------------------------------------- data

def data(mutate: Callable[[Path], None] | None = None, *, rows: list[tuple] | None = None, options: str = "{}",
         data_arg: str | None = "root", task_text: str | None = None) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        tasks, root = corpus_dataset(tmp, rows, options)
        if task_text is not None:
            (tasks / "x.yaml").write_text(task_text)
        if mutate:
            mutate(root)
        extra = [] if data_arg is None else ["--data", f"corpus={root if data_arg == 'root' else data_arg}"]
        return run_args(tasks, tmp, *extra)

    return setup


def write(rel: str, content: bytes | str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return mutate


def remove(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def dicom_without_pixels(path_rel: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a report, no image
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "SR"
        ds.PatientID = "p0"
        ds.save_as(root / path_rel, enforce_file_format=True)
    return mutate


def rows_with(index: int, row: tuple) -> list[tuple]:
    rows = list(GOOD_ROWS)
    rows[index] = row
    return rows


def _truncated_png(root: Path) -> None:
    good = png_bytes(value=7, size=64)
    (root / "images" / "img3.png").write_bytes(good[: len(good) // 2])


DATA = {
    "dataset-not-configured": (data(data_arg=None), ["x.yaml", "dataset.name", "not configured", "--data corpus=PATH"]),
    "dataset-root-missing": (data(data_arg="/nonexistent/corpus"),
                             ["/nonexistent/corpus", ": dataset.name: ", "dataset folder of 'corpus' not found"]),
    "dataset-root-is-a-file": (data(data_arg="/etc/hostname"), ["/etc/hostname", "dataset.name", "not found"]),
    "csv-missing": (data(remove("labels.csv")), ["labels.csv", "file not found"]),
    "csv-empty": (data(write("labels.csv", b"")), ["labels.csv", "file is empty (0 bytes)", "'patient'"]),
    "csv-missing-column": (data(write("labels.csv", "file,label\nimg0.png,1\n")),
                           ["labels.csv", ": patient: ", "column 'patient' is missing"]),
    "csv-duplicate-column": (data(write("labels.csv", "file,patient,label,label\nimg0.png,p0,1,0\n")),
                             ["labels.csv", ": label: ", "appears more than once"]),
    "csv-extra-field-in-row": (data(write("labels.csv", "file,patient,label\nimg0.png,p0,1\nimg1.png,p1,0,7\n")),
                               ["labels.csv", "line 3 has 4 fields, the header has 3"]),
    "csv-unterminated-quote": (data(write("labels.csv", 'file,patient,label\nimg0.png,"p0,1\n')),
                               ["labels.csv", "not a readable CSV", "unexpected end of data"]),
    "csv-binary-garbage": (data(write("labels.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")),
                           ["labels.csv", "column 'file' is missing"]),
    "label-not-a-number": (data(rows=rows_with(2, ("img2.png", "p2", "yes"))),
                           ["labels.csv", ": label:tuberculosis: ", "got 'yes'", "'img2.png'"]),
    "label-out-of-range": (data(rows=rows_with(5, ("img5.png", "p5", "2"))),
                           ["labels.csv", ": label:tuberculosis: ", "must be 1, 0 or missing", "got '2'"]),
    "label-negative": (data(rows=rows_with(1, ("img1.png", "p1", "-1"))),
                       ["labels.csv", ": label:tuberculosis: ", "got '-1'"]),
    "duplicate-sample": (data(rows=rows_with(1, ("img0.png", "p1", "0"))),
                         ["labels.csv", ": sample_id: ", "'img0.png' occurs more than once"]),
    "missing-patient-id": (data(rows=rows_with(4, ("img4.png", "", "0"))),
                           ["x.yaml", ": splits.group_by: ", "1 rows have no 'patient_id'"]),
    "age-not-a-number": (data(write("labels.csv", "file,patient,label,age\n" + "".join(
        f"img{i}.png,p{i},{i % 2},{'abc' if i == 3 else 40}\n" for i in range(8)))),
                         ["labels.csv", ": age: ", "value 'abc' of sample 'img3.png'", "Float64"]),
    "csv-option-escapes-root": (data(options="{csv: ../outside.csv}"),
                                ["x.yaml", "dataset.options.csv", "'../outside.csv' leaves the dataset folder",
                                 "--allow-outside-data-root"]),
    "csv-option-absolute": (data(options="{csv: /etc/passwd}"),
                            ["x.yaml", "dataset.options.csv", "'/etc/passwd' leaves the dataset folder"]),
    "image-folder-escapes-root": (data(options="{images: ../../..}"),
                                  ["x.yaml", "dataset.options.images", "leaves the dataset folder"]),
    "image-path-escapes-root": (data(rows=rows_with(0, ("../../../etc/hostname", "p0", "1"))),
                                ["labels.csv", ": path: ", "'images/../../../etc/hostname'", "leaves the dataset folder"]),
    "unknown-adapter-option": (data(options="{colour: red}"),
                               ["x.yaml", "dataset.options.colour", "unknown option; expected one of: csv, images"]),
    "image-missing": (data(remove("images/img3.png")), ["img3.png", "image file not found", "on_bad_image"]),
    "image-zero-bytes": (data(write("images/img3.png", b"")), ["img3.png", "image file is empty (0 bytes)"]),
    "image-truncated": (data(_truncated_png), ["img3.png", "corrupt or truncated image"]),
    "image-random-bytes": (data(write("images/img3.png", bytes(range(256)) * 4)),
                           ["img3.png", "not a readable image"]),
    "image-is-text": (data(write("images/img3.png", "this is not a picture\n")), ["img3.png", "not a readable image"]),
    "dicom-without-pixels": (data(dicom_without_pixels("images/scan.dcm"),
                                  rows=rows_with(3, ("scan.dcm", "p3", "1"))),
                             ["scan.dcm", ": PixelData: ", "holds no image"]),
    "dicom-garbage": (data(write("images/scan.dcm", b"\x00" * 128 + b"DICM" + b"\xff" * 64),
                           rows=rows_with(3, ("scan.dcm", "p3", "1"))), ["scan.dcm", "DICOM"]),
    "every-image-empty": (data(lambda root: [p.write_bytes(b"") for p in (root / "images").iterdir()]),
                          ["img0.png", "image file is empty (0 bytes)", "(and 7 more)"]),
}


# ---------------------------------------------------------------------------------------------- arguments

def args(*argv: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        return [a.replace("{tmp}", str(tmp)) for a in argv]
    return setup


def args_with_file(name: str, content: str, *argv: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        (tmp / name).write_text(content)
        return [a.replace("{tmp}", str(tmp)) for a in argv]
    return setup


RUN = ("run", "--threads", "1", "--out", "{tmp}/out")
ARGS = {
    "missing-backbone": (args("run", "--task", "smoke-tb"), ["Missing option '--backbone'", "medbench run --help"]),
    "seeds-zero": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--seeds", "0"),
                   ["'--seeds'", "greater than or equal to 1"]),
    "seeds-not-a-number": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--seeds", "abc"),
                           ["'--seeds'", "valid integer"]),
    "max-steps-zero": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--max-steps", "0"), ["'--max-steps'"]),
    "bad-engine": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--engine", "jax"), ["'--engine'", "'deepspeed'"]),
    "bad-zero-stage": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--zero-stage", "3"),
                       ["'--zero-stage'", "less than or equal to 2"]),
    "bad-precision": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--precision", "fp8"), ["'--precision'"]),
    "unknown-option": (args(*RUN, "-b", "cbr-tiny", "--bogus"), ["No such option: --bogus"]),
    "unknown-command": (args("trian"), ["No such command 'trian'"]),
    "list-what": (args("list", "models"), ["'what'", "'models' is not one of 'backbones'"]),
    "leaderboard-no-output": (args("leaderboard", "{tmp}"), ["Missing option '--output'"]),
    "data-not-name-path": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--data", "nih"),
                           [": --data: ", "expected NAME=PATH, got 'nih'"]),
    "tasks-dir-missing": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--tasks-dir", "{tmp}/nope"),
                          ["nope", ": --tasks-dir: ", "tasks folder not found"]),
    "weights-missing": (args(*RUN, "-b", "bit-m-r50x1", "-t", "smoke-tb", "--weights", "{tmp}/w.safetensors"),
                        ["w.safetensors", ": --weights: ", "weights file not found"]),
    "weights-bad-suffix": (args_with_file("w.txt", "x", *RUN, "-b", "bit-m-r50x1", "-t", "smoke-tb", "--weights",
                                          "{tmp}/w.txt"), ["w.txt", ": --weights: ", "unsupported weights file type"]),
    "weights-with-random-init": (args_with_file("w.safetensors", "x", *RUN, "-b", "cbr-tiny", "-t", "smoke-tb",
                                                "--init", "random", "--weights", "{tmp}/w.safetensors"),
                                 ["--weights", "does not read weights; drop one"]),
    "out-is-a-file": (args_with_file("out", "x", *RUN, "-b", "cbr-tiny", "-t", "smoke-tb"),
                      ["out", ": --out: ", "exists and is not a folder"]),
    "max-concurrent-inline": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--max-concurrent", "2"),
                              [": --max-concurrent: ", "only with --launcher local or slurm"]),
    "checkpoint-every-garbage": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--checkpoint-every", "5 parsecs"),
                                 ["--checkpoint-every", "expected a number of steps (500), a duration"]),
    "checkpoint-every-off-and-more": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--checkpoint-every", "off",
                                           "--checkpoint-every", "5"), ["--checkpoint-every", "cannot be combined"]),
    "unknown-init": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--init", "gaussian"),
                     [": --init: ", "unknown init scheme 'gaussian'"]),
    "no-weights-offline": (args(*RUN, "-b", "bit-m-r50x1", "-t", "smoke-tb"), ["bit-m-r50x1", "--init random"]),
    "unknown-backbone": (args(*RUN, "-b", "cbr-smal", "-t", "smoke-tb"),
                         ["unknown backbone 'cbr-smal'", "did you mean 'cbr-small'"]),
    "unknown-timm-model": (args(*RUN, "-b", "timm/resnet5000", "-t", "smoke-tb"),
                           [": --backbone: ", "timm has no model 'resnet5000'"]),
    "no-suite-or-task": (args(*RUN, "-b", "cbr-tiny"), [": --suite: ", "name at least one --suite or --task"]),
    "unknown-task": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tbb"), [": --task: ", "did you mean 'smoke-tb'"]),
    "unknown-suite": (args(*RUN, "-b", "cbr-tiny", "-s", "smok"), [": --suite: ", "did you mean 'smoke'"]),
    "fp16-on-cpu": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--precision", "fp16"),
                    [": --precision: ", "fp16 needs a CUDA device"]),
    "micro-batch-not-a-divisor": (args(*RUN, "-b", "cbr-tiny", "-t", "smoke-tb", "--micro-batch", "7"),
                                  [": --micro-batch: ", "micro-batch 7 does not divide the per-device batch 32"]),
    "score-nothing": (args("score", "{tmp}/nothing"), [": RUN_DIR: ", "no completed run folders found"]),
}

CORPUS = {**{f"spec/{k}": v for k, v in SPECS.items()}, **{f"data/{k}": v for k, v in DATA.items()},
          **{f"args/{k}": v for k, v in ARGS.items()}}


def invoke(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from medbench.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_corpus_is_large() -> None:
    assert len(CORPUS) >= 40
    assert min(len(SPECS), len(DATA), len(ARGS)) >= 10


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_input_gives_one_clear_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             recwarn: pytest.WarningsRecorder) -> None:
    setup, fragments = CORPUS[case]
    code, out, err = invoke(setup(tmp_path), capsys)
    # a Python warning would print more lines on a real terminal (pytest collects them instead)
    assert [str(w.message) for w in recwarn] == []
    assert code == 2, (case, out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("medbench: error: ")
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "out" / "runs").exists()  # nothing was trained


def test_corpus_baseline_is_valid(tmp_path: Path) -> None:
    """The unbroken corpus dataset passes every check, so each case fails for its own defect."""
    from medbench.data.locate import DataLocations
    from medbench.run.request import RunRequest
    from medbench.run.runner import Runner
    from medbench.spec.catalog import Catalog
    from medbench.store import RunStore

    tasks, root = corpus_dataset(tmp_path)
    runner = Runner(Catalog([tasks]), DataLocations(None, {"corpus": root}), RunStore(tmp_path / "out"))
    runner.preflight([RunRequest(task="x", backbone="cbr-tiny", seed=0)])
    assert len(runner.prepared("x").train_rows("binary")) > 0


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medbench.errors import SpecError

    argv = SPECS["unknown-key"][0](tmp_path)
    from medbench.cli import main

    with pytest.raises(SpecError, match="labelz"):
        main(["--debug", *argv])
    main_argv = argv
    code, _, err = invoke(main_argv, capsys)  # and without --debug, one line again
    assert code == 2 and err.count("\n") == 1


def test_errors_inside_the_progress_display_stay_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With the rich progress display on, a data error raised inside it still ends in one error line."""
    monkeypatch.setenv("MEDBENCH_PROGRESS", "1")
    setup, fragments = DATA["image-truncated"]
    code, out, err = invoke(setup(tmp_path), capsys)
    assert code == 2 and "Traceback" not in err + out
    last = err.strip().splitlines()[-1]
    assert last.startswith("medbench: error: ") and all(f in last for f in fragments)


def test_interrupt_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import medbench.run.runner

    def interrupted(self, requests):
        raise KeyboardInterrupt

    monkeypatch.setattr(medbench.run.runner.Runner, "preflight", interrupted)
    code, _, err = invoke(["run", "-b", "cbr-tiny", "-t", "smoke-tb", "--threads", "1", "--out", str(tmp_path)], capsys)
    assert code == 130
    assert err.strip().count("\n") == 0 and "interrupted" in err and "rerun the same command" in err


def test_unexpected_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import medbench.run.runner

    def broken(self, requests):
        raise ZeroDivisionError("a bug\nover two lines")

    monkeypatch.setattr(medbench.run.runner.Runner, "preflight", broken)
    code, _, err = invoke(["run", "-b", "cbr-tiny", "-t", "smoke-tb", "--threads", "1", "--out", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == ("medbench: error: unexpected ZeroDivisionError: a bug over two lines "
                           "(--debug shows the traceback)")
