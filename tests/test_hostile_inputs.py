"""A corpus of hostile inputs: task files, suites, cluster configs, weights files, datasets, stored results,
leaderboards and command-line numbers crafted to escape the data root, exhaust memory or recursion, slip
past validation, or destroy completed results (issue 16).

Every case runs the real command in-process through ``medbench.cli.main`` against a copy of one real,
completed run store (trained once for the module) and asserts:

* the exit code (2 for bad input; 0 where the input is handled: a damaged cache rebuilt, a looping
  dataset folder walked once, an image a board must not embed left out);
* one line on stderr naming the file (when there is one), the field and what was expected; never a
  traceback, never ``unexpected <Error>``;
* that the run store's files are byte-identical afterwards (every file, by sha256), whatever the command
  read, refused or failed on; and that nothing was trained.

The HTML page with script payloads in every string field is loaded in headless Chromium at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
N_IMAGES = 32

TASK = """\
task: hx
version: 1
family: hostile
dataset:
  name: hxdata
  adapter: csv
  options: {csv: labels.csv, path_column: file, path_root: images, path_suffix: .png, patient_column: patient,
            label_columns: {tb: finding}, sex_column: sex}
type: binary
labels: [tb]
attributes: [sex]
splits: {fractions: {train: 0.5, val: 0.25, test: 0.25}}
input: {resize: 16, crop: 12, channels: 1}
hyperrule: {batch_size: 8, schedule: [1, 2, 3, 4, 5], validation_points: 2}
scoring: {bootstrap: 40, min_group_size: 2}
default_seeds: 1
"""

BASE = """\
version: 1
family: hostile
dataset: {name: hxdata, adapter: csv, options: {csv: labels.csv, path_column: file, path_root: images,
          path_suffix: .png, patient_column: patient, label_columns: {tb: finding}}}
type: binary
labels: [tb]
splits: {fractions: {train: 0.5, val: 0.25, test: 0.25}}
input: {resize: 16, crop: 12, channels: 1}
hyperrule: {batch_size: 8, schedule: [1, 2, 3, 4, 5]}
"""


def png_bytes(value: int, size: int = 16) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(value)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    rows = ["file,patient,finding,sex"]
    for i in range(N_IMAGES):
        rows.append(f"img{i:02d},p{i:02d},{i % 2},{'MMFF'[i % 4]}")  # both sexes, both labels, in every split
        (root / "images" / f"img{i:02d}.png").write_bytes(png_bytes(i))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def invoke(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from medbench.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (links not followed)."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real completed run (cbr-tiny, 5 steps, plain torch engine) and its leaderboard, built once."""
    import torch

    from medbench.cli import main

    base = tmp_path_factory.mktemp("hostile-trained")
    tasks, data, store, cache = base / "tasks", base / "data" / "hxdata", base / "store", base / "cache"
    tasks.mkdir()
    (tasks / "hx.yaml").write_text(TASK)
    write_dataset(data)
    old_cache, threads = os.environ.get("MEDBENCH_CACHE"), torch.get_num_threads()
    os.environ["MEDBENCH_CACHE"] = str(cache)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["run", "-b", "cbr-tiny", "-t", "hx", "--tasks-dir", str(tasks), "--data", f"hxdata={data}",
                  "--out", str(store), "--threads", "1", "--engine", "torch"])
        assert exc.value.code in (0, None)
    finally:
        torch.set_num_threads(threads)
        if old_cache is None:
            os.environ.pop("MEDBENCH_CACHE", None)
        else:
            os.environ["MEDBENCH_CACHE"] = old_cache
    runs = list((store / "runs").glob("*/*/*"))
    assert len(runs) == 1 and json.loads((runs[0] / "result.json").read_text())["status"] == "ok"
    return {"tasks": tasks, "data": data, "store": store, "cache": cache, "snapshot": snapshot(store)}


@dataclass
class Ctx:
    """What a case may use: copies of the trained store, tasks, dataset and cache in its own folder."""

    tmp: Path
    tasks: Path
    data: Path
    store: Path
    cache: Path
    #: the dataset folder the store was trained on (cache entries are keyed on their folder); read only
    trained_data: Path
    extra: dict = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return next((self.store / "runs").glob("*/*/*"))

    def common(self) -> list[str]:
        return ["--tasks-dir", str(self.tasks), "--data", f"hxdata={self.data}"]

    def run_cmd(self, *extra: str, task: str = "hx") -> list[str]:
        return ["run", "-b", "cbr-tiny", "-t", task, *self.common(), "--out", str(self.store), "--threads", "1",
                "--engine", "torch", *extra]

    def task_file(self, name: str, text: str) -> None:
        (self.tasks / name).write_text(text)


@dataclass
class Case:
    setup: Callable[[Ctx], list[str]]
    #: substrings of the one error (or notice) line
    fragments: list[str]
    code: int = 2
    #: a check of its own after the command (the context and the command's stderr + stdout)
    check: Callable[[Ctx, str], None] | None = None
    #: a ``medbench run`` that ends normally rewrites the store's summary ``leaderboard.json`` (its date):
    #: every run folder must still be byte-identical
    rewrites_board: bool = False
    #: run as a user does, in a subprocess (a case that could hang on a broken walk)
    subprocess: bool = False


@pytest.fixture
def ctx(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    import torch

    for name in ("tasks", "data", "store", "cache"):
        shutil.copytree(trained[name], tmp_path / name, symlinks=True)
    monkeypatch.setenv("MEDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT", raising=False)
    threads = torch.get_num_threads()
    yield Ctx(tmp_path, tmp_path / "tasks", tmp_path / "data", tmp_path / "store", tmp_path / "cache", trained["data"])
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- builders

def task(body: str, name: str = "x", include_base: bool = True, extra_files: dict[str, str] | None = None,
         command: str = "run", flags: tuple[str, ...] = ()) -> Callable[[Ctx], list[str]]:
    """A task file ``<name>.yaml`` (on top of ``_hbase.yaml`` unless told otherwise), then a command on it."""
    def setup(c: Ctx) -> list[str]:
        c.task_file("_hbase.yaml", BASE)
        for fname, text in (extra_files or {}).items():
            c.task_file(fname, text)
        head = f"task: {name}\n" + ("include: _hbase.yaml\n" if include_base else "")
        c.task_file(f"{name}.yaml", head + body)
        if command == "inspect":
            return ["data", "inspect", name, *c.common(), *flags]
        return c.run_cmd(*flags, task=name)
    return setup


def files(texts: dict[str, str | bytes], argv: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        for fname, text in texts.items():
            target = c.tasks / fname
            target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
        return argv(c)
    return setup


def bomb(levels: int = 7, width: int = 9, indent: str = "") -> str:
    """A billion-laughs chain: level k is a list of ``width`` aliases of level k-1."""
    lines = [f"{indent}l0: &l0 [{', '.join(['lol'] * width)}]"]
    for k in range(1, levels + 1):
        lines.append(f"{indent}l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def cli(*argv: str) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        return [a.format(store=c.store, run=c.run, tmp=c.tmp, tasks=c.tasks, data=c.data) for a in argv]
    return setup


def then(first: Callable[[Ctx], None], argv: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        first(c)
        return argv(c)
    return setup


# ---------------------------------------------------------------------------------------------- 1. paths

PATHS = {
    "dataset-name-climbs-out": (task("dataset: {name: ../secret}\n"),
                                ["x.yaml", ": dataset.name: ", "expected a plain name", "'../secret'"]),
    "dataset-name-absolute-etc-passwd": (
        task("dataset: {name: /etc, adapter: csv, options: {csv: passwd, separator: ':', path_column: '1', "
             "label_column: '2'}}\nlabels: [tb]\n", include_base=True),
        ["x.yaml", ": dataset.name: ", "expected a plain name", "'/etc'"]),
    "dataset-name-nested": (task("dataset: {name: hxdata/images}\n"), ["x.yaml", ": dataset.name: ", "plain name"]),
    "dataset-name-dotdot": (task("dataset: {name: ..}\n"), ["x.yaml", ": dataset.name: ", "'..'"]),
    "dataset-name-backslash": (task("dataset: {name: 'a\\\\..\\\\b'}\n"), ["x.yaml", ": dataset.name: ", "plain name"]),
    "dataset-name-empty": (task("dataset: {name: ''}\n"), ["x.yaml", ": dataset.name: ", "non-empty"]),
    "dataset-name-switch-does-not-grant": (
        task("dataset: {name: ../secret}\n", flags=("--allow-outside-data-root",)),
        ["x.yaml", ": dataset.name: ", "plain name", "--data NAME=PATH"]),
    "dataset-name-inspect": (task("dataset: {name: ../secret}\n", command="inspect"),
                             ["x.yaml", ": dataset.name: ", "plain name"]),
    "dataset-name-of-an-ood-target": (
        task("ood: [{task: y}]\n", extra_files={"y.yaml": "task: y\ninclude: _hbase.yaml\ndataset: {name: ../../y}\n"}),
        ["y.yaml", ": dataset.name: ", "plain name"]),
    "csv-option-absolute": (task("dataset: {options: {csv: /etc/passwd}}\n"),
                            ["x.yaml", ": dataset.options.csv: ", "'/etc/passwd' leaves the dataset folder"]),
    "image-root-climbs-out": (task("dataset: {options: {path_root: ../../..}}\n"),
                              ["x.yaml", ": dataset.options.path_root: ", "leaves the dataset folder"]),
}


def _label_row_escapes(c: Ctx) -> None:
    text = (c.data / "labels.csv").read_text().replace("img03,", "../../../../etc/hostname,", 1)
    (c.data / "labels.csv").write_text(text)


PATHS["label-row-path-climbs-out"] = (then(_label_row_escapes, lambda c: c.run_cmd()),
                                      ["labels.csv", ": path: ", "leaves the dataset folder"])


# ---------------------------------------------------------------------------------------------- 2. YAML

def _cluster(text: str) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        (c.tmp / "cluster.yaml").write_text(text)
        return c.run_cmd("--launcher", "local", "--cluster-config", str(c.tmp / "cluster.yaml"))
    return setup


YAML = {
    "alias-bomb-in-task": (task(bomb()), ["x.yaml", ": line ", "aliases expand to more than 10,000 nodes"]),
    "alias-bomb-in-adapter-options": (
        task("dataset:\n  options:\n    bomb:\n" + bomb(indent="      ")),
        ["x.yaml", ": line ", "aliases expand"]),
    "alias-bomb-in-included-base": (
        task("", extra_files={"_hbase.yaml": BASE + bomb()}),
        ["_hbase.yaml", "included by", "aliases expand"]),
    "alias-bomb-in-suite": (files({"s.yaml": "suite: s\ntasks: [hx]\n" + bomb()},
                                  lambda c: ["run", "-b", "cbr-tiny", "-s", "s", *c.common(), "--out", str(c.store)]),
                            ["s.yaml", ": line ", "aliases expand"]),
    "alias-bomb-through-merge-keys": (  # a 60-key base merged into 200 mappings: 24,000 nodes
        task("x: &b {" + ", ".join(f"k{i}: {i}" for i in range(60)) + "}\n"
             + "".join(f"m{j}: {{<<: *b}}\n" for j in range(200))),
        ["x.yaml", ": line ", "aliases expand"]),
    "alias-bomb-in-cluster-config": (_cluster(bomb()), ["cluster.yaml", ": --cluster-config: ", "line", "aliases expand"]),
    "recursive-alias": (task("labels: &a [tb, *a]\n"), ["x.yaml", ": line 3: ", "inside its own anchor"]),
    "deep-flow-nesting": (task("hyperrule: " + "[" * 5000 + "]" * 5000 + "\n"),
                          ["x.yaml", ": line 3: ", "nested deeper than 64 levels"]),
    "deep-block-nesting": (task("".join("  " * i + f"k{i}:\n" for i in range(80)) + "  " * 80 + "v: 1\n"),
                           ["x.yaml", ": line ", "nested deeper than 64 levels"]),
    "deep-nesting-through-aliases": (
        task("a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: &b [[[[[[[[[[[[[[[[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n"),
        ["x.yaml", ": line 4: ", "nested deeper than 64 levels (through *a)"]),
    "duplicate-key": (task("labels: [tb]\nlabels: [nodule]\n"),
                      ["x.yaml", ": line 4: ", "duplicate key 'labels' (first at line 3)"]),
    "duplicate-nested-key": (task("hyperrule:\n  batch_size: 8\n  batch_size: 4096\n"),
                             ["x.yaml", ": line 5: ", "duplicate key 'batch_size' (first at line 4)"]),
    "duplicate-key-in-base": (task("", extra_files={"_hbase.yaml": BASE + "type: multiclass\n"}),
                              ["_hbase.yaml", "included by", ": line ", "duplicate key 'type'"]),
    "duplicate-task-key": (task("task: y\n"), ["x.yaml", ": line 3: ", "duplicate key 'task' (first at line 1)"]),
    "infinite-number-in-cluster-config": (_cluster("timeout_min: .inf\n"),
                                          ["cluster.yaml", ": --cluster-config: ", "timeout_min: expected a finite"]),
    "duplicate-key-in-cluster-config": (_cluster("timeout_min: 10\ntimeout_min: 100000\n"),
                                        ["cluster.yaml", ": --cluster-config: ", "line 2", "duplicate key"]),
    "oversized-yaml": (task("description: '" + "x" * (1 << 20) + "'\n"), ["x.yaml", "larger than 1024 KiB"]),
    "python-object-new-tag": (task("labels: !!python/object/new:os.system [echo pwned]\n"),
                              ["x.yaml", ": line 3: ", "invalid YAML", "constructor"]),
    "python-name-tag": (task("family: !!python/name:os.system\n"), ["x.yaml", ": line 3: ", "invalid YAML"]),
}


# ---------------------------------------------------------------------------------------------- 3. numbers

NUMBERS = {
    "batch-size-1e30": (task("hyperrule: {batch_size: 1.0e+30}\n"),
                        ["x.yaml", ": hyperrule.batch_size: ", "integer"]),
    "batch-size-huge-int": (task("hyperrule: {batch_size: 100000000}\n"),
                            ["x.yaml", ": hyperrule.batch_size: ", "less than or equal to 65536"]),
    "base-lr-inf": (task("hyperrule: {base_lr: .inf}\n"), ["x.yaml", ": hyperrule.base_lr: ", "finite number"]),
    "base-lr-nan": (task("hyperrule: {base_lr: .nan}\n"), ["x.yaml", ": hyperrule.base_lr: ", "finite number"]),
    "bootstrap-seed-negative": (task("scoring: {bootstrap_seed: -7}\n"),
                                ["x.yaml", ": scoring.bootstrap_seed: ", "greater than or equal to 0"]),
    "split-seed-negative": (task("splits: {seed: -1}\n"), ["x.yaml", ": splits.seed: ", "greater than or equal to 0"]),
    "resize-huge": (task("input: {resize: 1000000, crop: 12}\n"),
                    ["x.yaml", ": input.resize: ", "less than or equal to 8192"]),
    "schedule-endless": (task("hyperrule: {schedule: [1, 2, 3, 4, 1000000000000]}\n"),
                         ["x.yaml", ": hyperrule.schedule: ", "must end by step 100,000,000"]),
    "fraction-nan": (task("splits: {fractions: {train: .nan, val: 0.5, test: 0.5}}\n"),
                     ["x.yaml", ": splits.fractions.train: ", "finite number"]),
    "bins-infinite": (task("attributes: [{name: age_group, column: age, bins: [0, 50, .inf]}]\n"),
                      ["x.yaml", ": attributes.0.bins.2: ", "finite number"]),
    "adapter-option-nan": (task("dataset: {options: {noise: .nan}}\n"),
                           ["x.yaml", ": dataset.options: ", "option noise is not a finite number"]),
    "default-seeds-million": (task("default_seeds: 1000000\n"),
                              ["x.yaml", ": default_seeds: ", "less than or equal to 1000"]),
    "bootstrap-billion": (task("scoring: {bootstrap: 1000000000}\n"),
                          ["x.yaml", ": scoring.bootstrap: ", "less than or equal to 100000"]),
    "mixup-alpha-huge": (task("hyperrule: {mixup_alpha: 1.0e+300}\n"),
                         ["x.yaml", ": hyperrule.mixup_alpha: ", "less than or equal to 100"]),
    "suite-resolution-huge": (files({"s.yaml": "suite: s\ntasks: [hx]\nvariants: [{tasks: [hx], resolutions: "
                                               "[1000000000]}]\n"},
                                    lambda c: ["run", "-b", "cbr-tiny", "-s", "s", *c.common(), "--out", str(c.store)]),
                              ["s.yaml", ": variants.0.resolutions: ", "resolutions must be <= 8192 px"]),
    "cli-resolutions-1e9": (lambda c: c.run_cmd("--resolutions", "1000000000"),
                            [": --resolutions: ", "resolutions must be <= 8192 px, got 1000000000"]),
    "cli-resolutions-float": (lambda c: c.run_cmd("--resolutions", "1e9"),
                              [": --resolutions: ", "expected comma-separated numbers"]),
    "cli-fractions-nan": (lambda c: c.run_cmd("--fractions", "nan"), [": --fractions: ", "finite number"]),
    "cli-seeds-huge": (lambda c: c.run_cmd("--seeds", "1000000000000"), ["'--seeds'", "less than or equal to 1000"]),
    "cli-max-steps-huge": (lambda c: c.run_cmd("--max-steps", "1" + "0" * 30), ["'--max-steps'", "less than or equal to 100000000"]),
    "cli-micro-batch-huge": (lambda c: c.run_cmd("--micro-batch", "99999999"),  # N or 'auto': parsed by medbench
                             ["--micro-batch", "a number from 1 to 65536 or 'auto'"]),
    "cli-threads-huge": (lambda c: c.run_cmd("--threads", "99999999"), ["'--threads'", "less than or equal to 4096"]),
    "cli-assume-tflops-nan": (lambda c: c.run_cmd("--dry-run", "--assume-tflops", "nan"),
                              ["'--assume-tflops'", "less than or equal to 1000000000"]),
    "cli-assume-memory-nan": (lambda c: c.run_cmd("--dry-run", "--assume-memory", "nan"),
                              ["'--assume-memory'", "less than or equal to 1000000000"]),
    "score-bootstrap-huge": (cli("score", "{run}", "--bootstrap", "1000000000000"), ["'--bootstrap'", "less than or equal to 100000"]),
    "score-ci-level-nan": (cli("score", "{run}", "--ci-level", "nan"), ["'--ci-level'", "finite number"]),
    "score-sensitivity-nan": (cli("score", "{run}", "--threshold", "sensitivity:nan"),
                              [": --threshold: ", "target sensitivity must be in (0, 1]"]),
    "compare-tolerance-nan": (cli("compare", "{store}/leaderboard.json", "{store}/leaderboard.json", "--tolerance",
                                  "nan"), ["'--tolerance'", "finite number"]),
    "compare-k-seed-inf": (cli("compare", "{store}/leaderboard.json", "{store}/leaderboard.json", "--k-seed", "inf"),
                           ["'--k-seed'", "finite number"]),
}


# ---------------------------------------------------------------------------------------------- 4. weights

def _weights(name: str, make: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        path = c.tmp / name
        make(path)
        c.extra["marker"] = c.tmp / "pickle-ran"
        return c.run_cmd("--init", "pretrained", "--weights", str(path))
    return setup


def _cbr_tiny_state(in_chans: int = 3) -> dict:
    from medbench.backbones.cbr import build_cbr

    return {k: v.contiguous() for k, v in build_cbr("cbr-tiny", num_classes=1, in_chans=in_chans).state_dict().items()}


def _safetensors(mutate: Callable[[dict], dict]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        from safetensors.torch import save_file

        save_file(mutate(_cbr_tiny_state()), str(path))
    return make


def _with(key: str, value: float) -> Callable[[dict], dict]:
    def mutate(sd: dict) -> dict:
        sd[key] = sd[key].clone()
        sd[key].view(-1)[3] = value
        return sd
    return mutate


def _cbr_small(path: Path) -> None:
    from safetensors.torch import save_file

    from medbench.backbones.cbr import build_cbr

    save_file({k: v.contiguous() for k, v in build_cbr("cbr-small", num_classes=1, in_chans=3).state_dict().items()},
              str(path))


def _truncated(path: Path) -> None:
    _safetensors(lambda sd: sd)(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled(path: Path) -> None:
    import torch

    torch.save({"state_dict": {"blocks.0.0.weight": _Payload(path.parent / "pickle-ran")}}, path)


def _pth(obj_factory: Callable[[], object]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        import torch

        torch.save(obj_factory(), path)
    return make


def _pth_truncated(path: Path) -> None:
    import torch

    torch.save(_cbr_tiny_state(), path)
    path.write_bytes(path.read_bytes()[:300])


def _npz(arrays: Callable[[], dict]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        np.savez(path, **arrays())
    return make


def _not_run(c: Ctx, output: str) -> None:
    assert not c.extra["marker"].exists()
    assert "hyperrule.base_lr" not in output


WEIGHTS = {
    "weights-empty-file": (_weights("w.safetensors", lambda p: p.write_bytes(b"")),
                           ["w.safetensors", ": --weights: ", "empty (0 bytes)"]),
    "weights-garbage": (_weights("w.safetensors", lambda p: p.write_bytes(os.urandom(4096))),
                        ["w.safetensors", ": --weights: ", "cannot read weights"]),
    "weights-truncated": (_weights("w.safetensors", _truncated), ["w.safetensors", ": --weights: ", "cannot read weights"]),
    "weights-nan": (_weights("w.safetensors", _safetensors(_with("blocks.1.0.weight", float("nan")))),
                    ["w.safetensors", ": --weights: ", "tensor 'blocks.1.0.weight' holds 1 non-finite values"]),
    "weights-inf": (_weights("w.safetensors", _safetensors(_with("blocks.0.1.running_var", float("inf")))),
                    ["w.safetensors", ": --weights: ", "tensor 'blocks.0.1.running_var' holds 1 non-finite"]),
    "weights-of-another-architecture": (_weights("w.safetensors", _cbr_small),
                                        ["w.safetensors", ": --weights: ", "has shape"]),
    "weights-missing-tensors": (_weights("w.safetensors", _safetensors(lambda sd: {k: v for k, v in sd.items()
                                                                                  if not k.startswith("blocks.2")})),
                                ["w.safetensors", ": --weights: ", "tensors missing"]),
    "weights-no-tensors": (_weights("w.safetensors", _safetensors(lambda sd: {})),
                           ["w.safetensors", ": --weights: ", "holds no tensors"]),
    "weights-pickle-payload": (_weights("w.pth", _pickled), ["w.pth", ": --weights: ", "cannot read weights"]),
    "weights-pth-not-a-state-dict": (_weights("w.pth", _pth(lambda: [1, 2, 3])),
                                     ["w.pth", ": --weights: ", "no state dict"]),
    "weights-pth-truncated": (_weights("w.pth", _pth_truncated), ["w.pth", ": --weights: ", "cannot read weights"]),
    "weights-npz-object-array": (_weights("w.npz", _npz(lambda: {"a": np.array([{"x": 1}], dtype=object)})),
                                 ["w.npz", ": --weights: ", "cannot read weights"]),
    "weights-npz-nan": (_weights("w.npz", _npz(lambda: {"w": np.array([1.0, np.nan])})),
                        ["w.npz", ": --weights: ", "tensor 'w' holds 1 non-finite"]),
}
WEIGHTS = {k: (*v, _not_run) for k, v in WEIGHTS.items()}


# ---------------------------------------------------------------------------------------------- 5. stored results

def damage(rel: str, how: Callable[[Path], None]) -> Callable[[Ctx], None]:
    def act(c: Ctx) -> None:
        how(c.run / rel)
    return act


def _edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def how(path: Path) -> None:
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj, indent=2))
    return how


def _raise_auc(m: dict) -> None:
    m["test"]["auc"] = 0.999


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _deep_json(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _legacy_then(how: Callable[[Path], None], rel: str) -> Callable[[Ctx], None]:
    """A run completed by a medbench that recorded no digests (result.json without ``files``), then damaged."""
    def act(c: Ctx) -> None:
        _edit_json(lambda r: r.pop("files"))(c.run / "result.json")
        how(c.run / rel)
    return act


def _board_file(text: str) -> Callable[[Ctx], None]:
    def act(c: Ctx) -> None:
        (c.tmp / "board.json").write_text(text)
    return act


STORED = {
    "score-predictions-folder-missing": (
        then(damage("predictions", shutil.rmtree), cli("score", "{run}")),
        ["predictions/test.parquet", "predictions are missing", "nothing was rewritten"]),
    "score-test-predictions-truncated": (
        then(damage("predictions/test.parquet", _truncate), cli("score", "{run}")),
        ["predictions/test.parquet", "sha256 differs", "delete the run folder"]),
    "score-predictions-truncated-legacy": (
        then(_legacy_then(_truncate, "predictions/test.parquet"), cli("score", "{run}")),
        ["predictions/test.parquet", "not a readable predictions table"]),
    "score-predictions-sidecar-garbage-legacy": (
        then(_legacy_then(lambda p: p.write_text("{oops"), "predictions/val.json"), cli("score", "{run}")),
        ["predictions/val.json", "not JSON (line 1"]),
    "score-config-hand-edited": (
        then(damage("config.json", _edit_json(lambda cfg: cfg["task_spec"]["scoring"].update(bootstrap=0))),
             cli("score", "{run}")),
        ["config.json", "sha256 differs from the one result.json recorded"]),
    "score-history-hand-edited": (
        then(damage("history.json", _edit_json(lambda h: h["val_metric"].reverse())), cli("score", "{run}")),
        ["history.json", "sha256 differs"]),
    "leaderboard-metrics-hand-edited": (
        then(damage("metrics.json", _edit_json(_raise_auc)), cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["metrics.json", "sha256 differs from the one result.json recorded", "medbench score"]),
    "leaderboard-metrics-not-json": (
        then(damage("metrics.json", lambda p: p.write_text("{")), cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["metrics.json", "sha256 differs"]),
    "leaderboard-metrics-deleted": (
        then(damage("metrics.json", Path.unlink), cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["metrics.json", "missing, but result.json recorded it"]),
    "leaderboard-metrics-deep-legacy": (
        then(_legacy_then(_deep_json, "metrics.json"), cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["metrics.json", "nested deeper than 64 levels"]),
    "leaderboard-metrics-corrupt-legacy": (
        then(_legacy_then(lambda p: p.write_text('{"test": '), "metrics.json"),
             cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["metrics.json", "not JSON (line 1"]),
    "leaderboard-replicates-corrupt": (
        then(damage("bootstrap.parquet", _truncate), cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["bootstrap.parquet", "sha256 differs"]),
    "leaderboard-replicates-corrupt-legacy": (
        then(_legacy_then(_truncate, "bootstrap.parquet"), cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["bootstrap.parquet", "not readable bootstrap replicates"]),
    "leaderboard-result-json-corrupt": (
        then(damage("result.json", lambda p: p.write_text('{"status": "ok", ')),
             cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["result.json", "not JSON"]),
    "leaderboard-result-json-deep": (
        then(damage("result.json", _deep_json), cli("leaderboard", "{store}", "-o", "{tmp}/b.json")),
        ["result.json", "nested deeper than 64 levels"]),
    "paired-metrics-hand-edited": (
        then(damage("metrics.json", _edit_json(_raise_auc)), cli("paired", "{run}", "{run}")),
        ["metrics.json", "sha256 differs"]),
    "render-board-deep": (then(_board_file("{\"entries\": " + "[" * 100_000 + "]" * 100_000 + "}"),
                               cli("render", "{tmp}/board.json", "-o", "{tmp}/b.html")),
                          ["board.json", ": BOARD: ", "nested deeper than 64 levels"]),
    "compare-board-deep": (then(_board_file("[" * 3000 + "]" * 3000),
                                cli("compare", "{store}/leaderboard.json", "{tmp}/board.json")),
                           ["board.json", ": NEW: ", "nested deeper than 64 levels"]),
    "render-board-not-json": (then(_board_file("{\"schema\": "), cli("render", "{tmp}/board.json", "-o", "{tmp}/b.html")),
                              ["board.json", ": BOARD: ", "not JSON"]),
}


# ---------------------------------------------------------------------------------------------- 6. data and caches

def _header_only(c: Ctx) -> None:
    (c.data / "labels.csv").write_text("file,patient,finding,sex\n")


def _cache_entry(c: Ctx) -> tuple[Path, Path]:
    entries = list((c.cache / "images").glob("*/*.u8"))
    assert len(entries) == 1, entries
    return entries[0], entries[0].with_suffix(".json")


def _truncate_cache(c: Ctx) -> None:
    data, _ = _cache_entry(c)
    c.extra["cache"] = data
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


def _corrupt_cache_sidecar(c: Ctx) -> None:
    _, meta = _cache_entry(c)
    c.extra["cache"] = meta
    meta.write_text('{"shape": [')


def _run_on_trained_data(c: Ctx) -> list[str]:
    argv = c.run_cmd()
    argv[argv.index(f"hxdata={c.data}")] = f"hxdata={c.trained_data}"
    return argv


def _cache_rebuilt(c: Ctx, output: str) -> None:
    data, _ = _cache_entry(c)
    import medbench.data.cache as cache

    meta = json.loads(data.with_suffix(".json").read_text())
    assert cache._size_problem(data, tuple(meta["shape"])) is None  # whole again
    assert "1 run(s) were already complete and reused" in output  # nothing retrained


def _tb_layout_with_loops(c: Ctx) -> list[str]:
    root = c.tmp / "tuberculosis"
    images = root / "MontgomerySet" / "CXR_png"
    images.mkdir(parents=True)
    for i in range(12):
        (images / f"MCUCXR_{i:04d}_{i % 2}.png").write_bytes(png_bytes(i, 24))
    os.symlink(".", images / "again")  # two links to '.' and one to the top: a walk that follows them loops
    os.symlink(".", images / "once-more")
    os.symlink("..", root / "MontgomerySet" / "up")
    return ["data", "inspect", "tuberculosis-montgomery", "--data", f"tuberculosis={root}", "--json"]


def _twelve_images_once(c: Ctx, output: str) -> None:
    summary = json.loads(output[output.index("{"):])
    assert summary["n"] == 12, summary["n"]


DATA = {
    "csv-header-only-run": (then(_header_only, lambda c: c.run_cmd()),
                            ["labels.csv", "0 data rows under the header; expected at least 1"]),
    "csv-header-only-inspect": (then(_header_only, lambda c: ["data", "inspect", "hx", *c.common()]),
                                ["labels.csv", "0 data rows"]),
    "cache-truncated-is-rebuilt": (then(_truncate_cache, _run_on_trained_data),
                                   ["preprocessing cache entry is damaged", "bytes, expected", "rebuilding it"], 0,
                                   _cache_rebuilt, True),
    "cache-sidecar-corrupt-is-rebuilt": (then(_corrupt_cache_sidecar, _run_on_trained_data),
                                         ["preprocessing cache sidecar is unreadable; rebuilding"], 0, _cache_rebuilt,
                                         True),
    # in a subprocess: on a walk that follows the links this would not end (the subprocess's timeout guards)
    "tuberculosis-symlink-loops": (_tb_layout_with_loops, [], 0, _twelve_images_once, False, True),
}


# ---------------------------------------------------------------------------------------------- 7. boards and images

def _board_naming(paths: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    """The store's own board, with its entry's reliability diagrams replaced by ``paths``."""
    def setup(c: Ctx) -> list[str]:
        board = json.loads((c.store / "leaderboard.json").read_text())
        board["entries"][0]["calibration"]["reliability_diagrams"] = paths(c)
        (c.tmp / "board.json").write_text(json.dumps(board))
        return ["render", str(c.tmp / "board.json"), "-o", str(c.tmp / "b.html")]
    return setup


def _secret_png(c: Ctx) -> list[str]:
    secret = c.tmp / "secret.png"
    secret.write_bytes(png_bytes(4242, 20))
    c.extra["secret"] = secret
    return [str(secret)]


def _text_as_png(legacy: bool) -> Callable[[Ctx], list[str]]:
    """The run's own reliability diagram replaced by text (``legacy``: in a run that recorded no digests,
    so only the PNG signature can tell)."""
    def paths(c: Ctx) -> list[str]:
        if legacy:
            _edit_json(lambda r: r.pop("files"))(c.run / "result.json")
        fake = c.run / "calibration" / "reliability-test.png"
        c.extra["secret"] = fake
        fake.write_text("not a picture: the first line of some private file")
        return [str(fake)]
    return paths


def _linked_out(c: Ctx) -> list[str]:
    secret = c.tmp / "outside" / "reliability-test.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes(77, 20))
    c.extra["secret"] = secret
    link = c.run / "calibration"
    shutil.rmtree(link)
    os.symlink(secret.parent, link)
    return [str(link / "reliability-test.png")]


def _not_embedded(c: Ctx, output: str) -> None:
    import base64

    page = (c.tmp / "b.html").read_text()
    assert base64.b64encode(c.extra["secret"].read_bytes()).decode()[:200] not in page
    assert "data:image/png;base64," not in page.split('id="view-calibration"', 1)[1].split("</section>", 1)[0]
    assert "not shown" in page


TERMINAL = "x[/]\x1b]0;retitled\x07\x1b[2J[link=file:///etc/passwd]y[/link]\x9b31m"


def _board_with_names(c: Ctx) -> list[str]:
    """The store's board with the entry's names full of rich markup and terminal control sequences."""
    board = json.loads((c.store / "leaderboard.json").read_text())
    e = board["entries"][0]
    e["task"], e["backbone"], e["init"] = TERMINAL, TERMINAL, TERMINAL
    (c.tmp / "board.json").write_text(json.dumps(board))
    return ["compare", str(c.tmp / "board.json"), str(c.tmp / "board.json")]


def _terminal_untouched(c: Ctx, output: str) -> None:
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", output.replace("\n", ""))  # no control sequence
    assert "x[/]" in output and "[link=" in output  # markup shown as text (the cell may wrap)


BOARDS = {
    "compare-names-with-markup-and-terminal-codes": (_board_with_names, [], 0, _terminal_untouched),
    "render-never-embeds-another-png": (_board_naming(_secret_png), [], 0, _not_embedded),
    "render-checks-the-recorded-digest": (_board_naming(_text_as_png(False)), [], 0, _not_embedded),
    "render-checks-the-png-signature": (_board_naming(_text_as_png(True)), [], 0, _not_embedded),
    "render-refuses-a-link-out-of-the-run": (_board_naming(_linked_out), [], 0, _not_embedded),
}


CORPUS = {**{f"paths/{k}": Case(*v) for k, v in PATHS.items()}, **{f"yaml/{k}": Case(*v) for k, v in YAML.items()},
          **{f"numbers/{k}": Case(*v) for k, v in NUMBERS.items()},
          **{f"weights/{k}": Case(v[0], v[1], 2, v[2]) for k, v in WEIGHTS.items()},
          **{f"stored/{k}": Case(*v) for k, v in STORED.items()}, **{f"data/{k}": Case(*v) for k, v in DATA.items()},
          **{f"boards/{k}": Case(*v) for k, v in BOARDS.items()}}


def test_the_corpus_covers_every_class() -> None:
    assert len(CORPUS) >= 60
    kinds = {k.split("/")[0] for k in CORPUS}
    assert kinds == {"paths", "yaml", "numbers", "weights", "stored", "data", "boards"}
    assert len(WEIGHTS) >= 12


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_input(name: str, ctx: Ctx, trained: dict, capsys: pytest.CaptureFixture,
                       recwarn: pytest.WarningsRecorder) -> None:
    case = CORPUS[name]
    argv = case.setup(ctx)
    before = snapshot(ctx.store)
    if case.subprocess:
        from conftest import run_cli

        proc = run_cli(*argv, env={"MEDBENCH_CACHE": str(ctx.cache)}, timeout=600)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = invoke(argv, capsys)
    assert code == case.code, (name, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err and "unexpected" not in err, err
    assert [str(w.message) for w in recwarn if "medbench" in str(w.filename)] == []
    lines = err.strip().splitlines()
    if case.code:
        assert len(lines) == 1, err
        assert lines[0].startswith("medbench: error: "), lines[0]
        missing = [f for f in case.fragments if f not in lines[0]]
        assert not missing, (missing, lines[0])
    elif case.fragments:
        notices = [ln for ln in (err + out).splitlines() if all(f in ln for f in case.fragments)]
        assert len(notices) == 1, (err, out)
        assert str(ctx.extra["cache"]) in notices[0]
    if case.check:
        case.check(ctx, err + out)
    # earlier results are byte-identical: whatever the command read, refused or failed on
    after = snapshot(ctx.store)
    if case.rewrites_board:
        assert after.pop("leaderboard.json") and before.pop("leaderboard.json")
    assert after == before
    assert sorted((ctx.store / "runs").glob("*/*/*")) == [ctx.run]  # nothing else was trained
    assert snapshot(trained["store"]) == trained["snapshot"]


# ---------------------------------------------------------------------------------------------- legitimate use

def test_a_completed_run_records_the_digest_of_every_file(trained: dict) -> None:
    """result.json holds the sha256 of every other file of the run folder (hashlib over the bytes on disk)."""
    run = next((trained["store"] / "runs").glob("*/*/*"))
    files = json.loads((run / "result.json").read_text())["files"]
    on_disk = {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*")
               if p.is_file() and p.name != "result.json" and not p.name.startswith(".")}
    assert files == on_disk
    assert {"metrics.json", "bootstrap.parquet", "config.json", "history.json", "predictions/test.parquet",
            "predictions/val.parquet", "calibration/reliability-test.png"} <= set(files)


def test_a_rescore_is_recorded_and_accepted(ctx: Ctx, capsys: pytest.CaptureFixture) -> None:
    """`medbench score` with other settings rewrites metrics.json and records its new digest: the
    leaderboard accepts it (a re-score is not an edit), and the numbers are the new ones."""
    before = json.loads((ctx.run / "metrics.json").read_text())
    code, _, err = invoke(["score", str(ctx.run), "--bootstrap", "30", "--ece-bins", "5"], capsys)
    assert code == 0, err
    after = json.loads((ctx.run / "metrics.json").read_text())
    assert after["scoring"]["ece_bins"] == 5 and before["scoring"]["ece_bins"] == 15
    result = json.loads((ctx.run / "result.json").read_text())
    assert result["files"]["metrics.json"] == hashlib.sha256((ctx.run / "metrics.json").read_bytes()).hexdigest()
    assert result["metrics"] == after and result["rescored"]
    code, _, err = invoke(["leaderboard", str(ctx.store), "-o", str(ctx.tmp / "b.json")], capsys)
    assert code == 0, err
    board = json.loads((ctx.tmp / "b.json").read_text())
    assert board["entries"][0]["headline"]["mean"] == after["test"]["auc"]


def _as_scored_by_an_older_medbench(run: Path, version: int = 0) -> bytes:
    """metrics.json as an older scoring version wrote it, recorded as such in result.json (what an older
    medbench that recorded digests left behind); returns its bytes."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["scoring"]["scoring_version"] = version
    metrics["test"]["auc"] = 0.123456  # older code, other numbers
    data = json.dumps(metrics).encode()
    (run / "metrics.json").write_bytes(data)
    result = json.loads((run / "result.json").read_text())
    result["files"]["metrics.json"] = hashlib.sha256(data).hexdigest()
    (run / "result.json").write_text(json.dumps(result))
    return data


def test_a_rescore_for_a_new_scoring_version_is_recorded_by_the_same_writer(ctx: Ctx,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """issue 14's re-scoring of runs scored by an older version (``medbench leaderboard`` reusing them) records
    the new digests in result.json: the board accepts the run, every recorded digest is the file's sha256
    (hashlib over the bytes on disk), and a later edit is still refused."""
    from medbench.scoring.version import SCORING_VERSION

    old = _as_scored_by_an_older_medbench(ctx.run)
    code, out, err = invoke(["leaderboard", str(ctx.store), "-o", str(ctx.tmp / "b.json")], capsys)
    assert code == 0, err
    assert "re-scored from its saved predictions" in out + err
    metrics = json.loads((ctx.run / "metrics.json").read_text())
    assert metrics["scoring"]["scoring_version"] == SCORING_VERSION and (ctx.run / "metrics.json").read_bytes() != old
    result = json.loads((ctx.run / "result.json").read_text())
    on_disk = {str(p.relative_to(ctx.run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in ctx.run.rglob("*")
               if p.is_file() and p.name != "result.json" and not p.name.startswith(".")}
    assert result["files"] == on_disk and result["metrics"] == metrics and result["rescored"]
    board = json.loads((ctx.tmp / "b.json").read_text())
    assert board["entries"][0]["headline"]["mean"] == metrics["test"]["auc"] != 0.123456
    _raise_auc(metrics)
    (ctx.run / "metrics.json").write_text(json.dumps(metrics))
    edited = snapshot(ctx.store)
    code, _, err = invoke(["leaderboard", str(ctx.store), "-o", str(ctx.tmp / "c.json")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(ctx.run / "metrics.json") in err and "sha256 differs" in err, err
    assert snapshot(ctx.store) == edited


@pytest.mark.parametrize("command", ["leaderboard", "paired"])
def test_an_edit_that_claims_an_older_scoring_version_is_refused_not_rescored(command: str, ctx: Ctx,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """A hand edit of metrics.json that also sets an old scoring_version would otherwise be re-scored over (the
    edit laundered into a legitimate record): it is refused, naming the file, and nothing is written."""
    metrics = json.loads((ctx.run / "metrics.json").read_text())
    metrics["scoring"]["scoring_version"] = 0
    (ctx.run / "metrics.json").write_text(json.dumps(metrics))
    before = snapshot(ctx.store)
    argv = (["leaderboard", str(ctx.store), "-o", str(ctx.tmp / "b.json")] if command == "leaderboard"
            else ["paired", str(ctx.run), str(ctx.run)])
    code, _, err = invoke(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(ctx.run / "metrics.json") in err and "sha256 differs" in err, err
    assert snapshot(ctx.store) == before


def test_task_new_writes_names_from_the_command_line_and_the_csv_as_data(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """The task file 'medbench task new' writes (issue 17) holds the CSV's file name in a comment: a name with a
    line break must not become YAML of its own (here a second 'version' key, which the one YAML reader would
    refuse, and a flow sequence left open)."""
    from medbench.yamlio import read_yaml

    data = tmp_path / "own"
    write_dataset(data)
    csv = data / "labels\nversion: 7\nfamily: [x\n#.csv"
    (data / "labels.csv").rename(csv)
    out = tmp_path / "tasks" / "own.yaml"
    code, _, err = invoke(["task", "new", "own", "--csv", str(csv), "--root", str(data), "--label", "finding",
                           "--path", "file", "--out", str(out)], capsys)
    assert code == 0, err
    spec = read_yaml(out)
    assert spec["version"] == 1 and spec["dataset"]["name"] == "own" and spec["dataset"]["options"]["csv"] == csv.name


def test_dataset_names_the_user_gives_may_point_anywhere(ctx: Ctx, capsys: pytest.CaptureFixture) -> None:
    """The rule binds task files, not the user: --data NAME=PATH may name any folder."""
    elsewhere = ctx.tmp / "far" / "away"
    shutil.copytree(ctx.data, elsewhere)
    code, out, err = invoke(["data", "inspect", "hx", "--tasks-dir", str(ctx.tasks), "--data", f"hxdata={elsewhere}",
                             "--json"], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["n"] == N_IMAGES


def test_yaml_merge_keys_and_moderate_aliases_still_read(tmp_path: Path) -> None:
    """The bounds leave ordinary YAML alone: merge keys may override, a few aliases are fine."""
    from medbench.yamlio import ALIAS_NODE_BUDGET, parse_yaml

    data = parse_yaml("base: &b {a: 1, b: [1, 2]}\nx:\n  <<: *b\n  a: 5\ny: [*b, *b]\n", where="f.yaml")
    assert data["x"] == {"a": 5, "b": [1, 2]} and data["y"] == [{"a": 1, "b": [1, 2]}] * 2
    width = 9
    levels = 1
    while width ** (levels + 1) * width <= ALIAS_NODE_BUDGET:  # the deepest chain that fits
        levels += 1
    assert parse_yaml(bomb(levels=levels - 1, width=width), where="f.yaml")


# ---------------------------------------------------------------------------------------------- the HTML page

#: one string that tries every way out of its context: a text node, a double- and a single-quoted attribute,
#: a comment, a script element (the page's JSON data block), an SVG text node, a URL
PAYLOAD = ("\"'><script>document.body.dataset.pwned='script'</script>"
           "<img src=x onerror=\"document.body.dataset.pwned='img'\">"
           "<svg onload=\"document.body.dataset.pwned='svg'\"></svg>"
           "\" autofocus onfocus=\"document.body.dataset.pwned='attr'\" x=\"--!></script><!--\u2028javascript:alert(1)"
           # and the ways out of a Markdown table cell: a cell break, a line break starting a block, links,
           # images, emphasis, code, an autolink, an entity
           " | col\n## heading\n- item [a](javascript:alert(1)) ![i](https://evil.example/i.png) **b** _c_ `d` "
           "<https://evil.example> &#60;script&#62;")


def hostile(text: object) -> str:
    return f"{text}{PAYLOAD}"


class _Tree:
    """What Python's own HTML parser (an independent oracle) makes of a fragment: elements with their
    attributes, and the text."""

    def __init__(self, markup: str):
        from html.parser import HTMLParser

        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        tree = self

        class P(HTMLParser):
            def handle_starttag(self, tag, attrs):
                tree.tags.append((tag, dict(attrs)))

            def handle_data(self, data):
                tree.text.append(data)

            def handle_comment(self, data):
                tree.tags.append(("!--", {"comment": data}))

        parser = P(convert_charrefs=True)
        parser.feed(markup)
        parser.close()


def test_the_element_builder_escapes_for_each_context() -> None:
    from medbench.board.html import el, json_script, safe_url

    markup = el("td", {"class": "value", "data-value": PAYLOAD, "title": PAYLOAD}, PAYLOAD, el("b", None, PAYLOAD))
    tree = _Tree(markup)
    assert [t for t, _ in tree.tags] == ["td", "b"]  # no element, comment or attribute smuggled in
    assert tree.tags[0][1] == {"class": "value", "data-value": PAYLOAD, "title": PAYLOAD}
    assert "".join(tree.text) == PAYLOAD * 2  # the text is the text, character for character
    block = json_script("d", {"k": PAYLOAD, PAYLOAD: [PAYLOAD]})
    inner = block.split(">", 1)[1].rsplit("</script>", 1)[0]
    assert "</" not in inner and "<!--" not in inner and "\u2028" not in inner
    assert json.loads(inner) == {"k": PAYLOAD, PAYLOAD: [PAYLOAD]}
    for bad in ("javascript:alert(1)", "https://evil.example/x.png", "data:text/html;base64,PHNjcmlwdD4=", "//x"):
        with pytest.raises(ValueError):
            safe_url(bad)
        with pytest.raises(ValueError):
            el("a", {"href": bad}, "x")
    for name in ("onclick", "style", "x y", "a\"b"):
        with pytest.raises(ValueError):
            el("span", {name: "1"})
    with pytest.raises(ValueError):
        el("script", None, "alert(1)")


def test_svg_plots_are_checked_and_carry_names_as_text() -> None:
    """Plot labels come from the board: they stay SVG text; a foreign element or an event attribute in an SVG is
    refused outright."""
    from medbench.board.html import svg
    from medbench.board.plots import fairness_groups

    entry = {"task": hostile("t"), "backbone": hostile("b"),
             "fairness": {"attributes": {hostile("sex"): {"groups": {
                 hostile("F"): {"n": 30, "auc": {"mean": 0.7, "ci": {"low": 0.6, "high": 0.8}}},
                 hostile("M"): {"n": 30, "auc": {"mean": 0.8, "ci": {"low": 0.7, "high": 0.9}}}}}}}}
    plot = fairness_groups(entry, hostile("sex"))
    tree = _Tree(plot)
    assert tree.tags[0][0] == "svg" and tree.tags[0][1]["data-plot"] == f"fairness-{hostile('sex')}"
    assert not any(t in ("script", "img", "foreignobject", "!--") for t, _ in tree.tags)
    assert not any(k.startswith("on") for _, attrs in tree.tags for k in attrs)
    assert any(PAYLOAD.split("<svg")[0] in t for t in tree.text)  # the title is text
    ok = '<svg xmlns="http://www.w3.org/2000/svg"><text>a</text></svg>'
    assert "data-plot" in svg(ok, {"data-plot": "p"})
    for bad in ('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
                '<svg xmlns="http://www.w3.org/2000/svg"><g onclick="x()"/></svg>',
                '<svg xmlns="http://www.w3.org/2000/svg"><foreignObject><div/></foreignObject></svg>',
                '<svg xmlns="http://www.w3.org/2000/svg" xmlns:l="http://www.w3.org/1999/xlink">'
                '<image l:href="https://evil.example/x.png"/></svg>'):
        with pytest.raises(ValueError):
            svg(bad, {})


def _hostile_board(board: dict) -> dict:
    """Every string a person or a task file can choose, in every entry: task, backbone, init, label names,
    attributes and their groups, OOD targets, provenance, the significance method, figure paths."""
    out = json.loads(json.dumps(board))
    out["created"] = hostile(out["created"])
    out["provenance"] = {k: hostile(v) if isinstance(v, str) else v for k, v in out["provenance"].items()}
    out["provenance"]["libraries"] = {hostile(k): hostile(v) for k, v in board["provenance"]["libraries"].items()}
    if out.get("significance"):
        out["significance"]["test"] = hostile(out["significance"]["test"])
        out["significance"]["group_by"] = [hostile(g) for g in out["significance"]["group_by"]]
    for m in out.get("shift_matrix") or []:
        m["backbone"], m["init"] = hostile(m["backbone"]), hostile(m["init"])
        m["rows"], m["columns"] = [hostile(r) for r in m["rows"]], [hostile(c) for c in m["columns"]]
        for cell in m["cells"]:
            cell["trained_on"], cell["evaluated_on"] = hostile(cell["trained_on"]), hostile(cell["evaluated_on"])
    for e in out["entries"]:
        for key in ("task", "backbone", "init"):
            e[key] = hostile(e[key])
        e["metrics"] = {(k.split("/")[0] + "/" + hostile(k.split("/", 1)[1]) if "/" in k else k): v
                        for k, v in e["metrics"].items()}
        e["ood"] = {hostile(k): v for k, v in (e.get("ood") or {}).items()}
        if e.get("shift"):
            e["shift"] = {hostile(k): v for k, v in e["shift"].items()}
        attrs = (e.get("fairness") or {}).get("attributes") or {}
        for name in list(attrs):
            a = attrs.pop(name)
            a["groups"] = {hostile(g): b for g, b in (a.get("groups") or {}).items()}
            if isinstance(a.get("worst_group"), dict):
                a["worst_group"] = {k: hostile(v) if isinstance(v, str) else v for k, v in a["worst_group"].items()}
            attrs[hostile(name)] = a
        prov = e["provenance"]
        for k, v in list(prov.items()):
            if isinstance(v, str) and k != "weights_sha256":
                prov[k] = hostile(v)
        prov["device"] = {k: hostile(v) if isinstance(v, str) else v for k, v in (prov.get("device") or {}).items()}
        cal = e.get("calibration") or {}
        if cal.get("reliability_diagrams"):
            cal["reliability_diagrams"] = [hostile(p) for p in cal["reliability_diagrams"]] + cal["reliability_diagrams"]
        if e.get("significance") and e["significance"].get("reason"):
            e["significance"]["reason"] = hostile(e["significance"]["reason"])
        # issue 14's warnings and issue 20's protocols are strings of a board too
        e["warnings"] = [*(e.get("warnings") or []),
                         {"code": hostile("w"), "message": hostile("m"), "variant": hostile("v"), "seeds": [0]}]
        e["protocol"] = "linear" if e["backbone"].startswith("fake-b") else hostile("knn")
    return out


@pytest.fixture(scope="module")
def hostile_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A board of two backbones x two seeds with OOD, fairness, calibration and data-efficiency blocks
    (generated run folders, no training), every string made hostile, rendered by the command."""
    from fake_runs import task_spec, write_run

    from medbench.board.aggregate import build_leaderboard
    from medbench.board.schema import validate_board
    from medbench.store import find_run_dirs
    from medbench.store.scores import rescore

    out = tmp_path_factory.mktemp("hostile-board")
    spec = task_spec("smoke-cxr", bootstrap=20)
    for backbone, strength in (("fake-a", 1.5), ("fake-b", 1.0)):
        for seed in (0, 1):
            write_run(out / "store", backbone=backbone, seed=seed, strength=strength, n_test=80, n_val=40,
                      n_ood=40, spec=spec)
        write_run(out / "store", backbone=backbone, seed=0, strength=strength * 0.7, n_test=80, n_val=40,
                  n_ood=40, spec=spec, variant={"kind": "fraction", "value": 0.1, "n_train": 40})
    runs = find_run_dirs([out / "store"])
    for run in runs:
        rescore(run)
    board = _hostile_board(build_leaderboard(runs))
    validate_board(board, where="hostile board")  # a schema-valid board: render accepts it
    path = out / "hostile.json"
    path.write_text(json.dumps(board))
    from conftest import run_cli

    proc = run_cli("render", str(path), "--format", "html", "-o", str(out / "hostile.html"))
    assert proc.returncode == 0, proc.stderr
    return out / "hostile.html", board


def test_hostile_board_renders_as_text(hostile_page: tuple[Path, dict]) -> None:
    page_path, board = hostile_page
    page = page_path.read_text()
    assert page.count("<script") == 2  # the JSON data block and the page's own script, nothing else
    assert "document.body.dataset.pwned" in page  # the payloads are there ...
    assert "<script>document.body" not in page and "<img src=x" not in page and "<svg onload" not in page  # ... as text
    data = page.split('<script type="application/json" id="leaderboard-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data) == board  # the board rides along, intact, unable to close its element
    import html

    csp = html.unescape(re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
    script = page.rsplit("<script>", 1)[1].split("</script>", 1)[0]
    import base64

    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in \
        csp.split("script-src", 1)[1].split(";", 1)[0]
    for plot in ("fairness-", "shift-matrix", "calibration-ece", "data-efficiency-fraction"):
        assert f'data-plot="{plot}' in page, plot
    assert page.count('data-plot="reliability"') == 2  # each entry's own diagram; the hostile paths are not read
    listed = sum(len(e["calibration"]["reliability_diagrams"]) // 2 for e in board["entries"])
    assert page.count("not shown: it is not the reliability diagram of one of this entry&#x27;s runs") == listed == 4


#: what a Markdown board may become in HTML: the structure render_markdown writes, nothing from data
_MARKDOWN_TAGS = {"h1", "h2", "h3", "p", "table", "thead", "tbody", "tr", "th", "td", "strong", "em", "ul", "li"}


def test_the_markdown_board_carries_every_string_as_text(hostile_page: tuple[Path, dict], tmp_path: Path) -> None:
    """The Markdown board (issue 17; for pull-request comments and papers) rendered by a CommonMark renderer with
    tables and raw HTML enabled (markdown-it-py, an independent oracle): every payload stays the text of its
    cell, line or heading: no element, link, image, code span or emphasis from data, no extra row or column, and
    the table rows keep their number of cells."""
    from markdown_it import MarkdownIt

    from conftest import run_cli

    page_path, board = hostile_page
    md_path = tmp_path / "hostile.md"
    proc = run_cli("render", str(page_path.parent / "hostile.json"), "--format", "md", "-o", str(md_path))
    assert proc.returncode == 0, proc.stderr
    md = md_path.read_text()
    renderer = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    tree = _Tree(renderer.render(md))
    assert {t for t, _ in tree.tags} <= _MARKDOWN_TAGS, {t for t, _ in tree.tags} - _MARKDOWN_TAGS
    assert all(attrs == {} for _, attrs in tree.tags)  # no link target, image source or handler anywhere
    text = "".join(tree.text)
    one_line = " ".join(PAYLOAD.split())
    assert text.count(one_line) >= len(board["entries"]) * 3  # task, backbone, init of every entry, as text
    # the Markdown bold of the best entry is the renderer's, around a number
    strong = re.findall(r"<strong>(.*?)</strong>", renderer.render(md))
    assert strong and all(re.fullmatch(r"[0-9.]+ ± [0-9.]+|[0-9.]+|Bold", s) for s in strong), strong
    lines, width = md.splitlines(), None

    def cells(row: str) -> int:
        return len(re.split(r"(?<!\\)\|", row)) - 2

    for i, line in enumerate(lines):
        if not line.startswith("|") or line.startswith("|---"):
            continue
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            width = cells(line)  # a table's header
        else:
            assert cells(line) == width, line


def _chromium_dom(url: str, tmp_path: Path) -> str:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium; .ci/run installs it)")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=3000", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("view", ["overview", "significance", "calibration", "fairness", "shift", "data-efficiency",
                                  "provenance"])
def test_no_script_from_a_board_runs_in_chromium(hostile_page: tuple[Path, dict], tmp_path: Path, view: str) -> None:
    page_path, _ = hostile_page
    dom = _chromium_dom(page_path.as_uri() + f"#view={view}", tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="true"' in body and f'data-view="{view}"' in body  # the page's own script ran ...
    assert "data-pwned" not in body  # ... and no other
    assert "&lt;script&gt;document.body.dataset.pwned" in dom  # the payload is on the page, as text


@pytest.mark.slow
def test_the_content_security_policy_alone_stops_an_injected_script(hostile_page: tuple[Path, dict],
                                                                    tmp_path: Path) -> None:
    """Defence in depth: markup injected past the builder (as if a render function had a bug) still does not
    run, because the page's policy allows its own script only."""
    page_path, _ = hostile_page
    page = page_path.read_text()
    injected = page.replace("</h1>", "</h1><script>document.body.dataset.pwned='inline'</script>"
                                     "<img src=x onerror=\"document.body.dataset.pwned='handler'\">", 1)
    target = tmp_path / "injected.html"
    target.write_text(injected)
    body = re.search(r"<body[^>]*>", _chromium_dom(target.as_uri(), tmp_path)).group(0)
    assert 'data-ready="true"' in body and "data-pwned" not in body
