"""Packaging: the wheel carries the task files; third-party packages plug in via entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(out))
    (whl,) = out.glob("medbench-*.whl")
    return whl


def test_wheel_contains_tasks_and_published_leaderboards(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "medbench/_builtin/tasks/suites/smoke.yaml" in names
    assert "medbench/_builtin/tasks/smoke/_smoke-base.yaml" in names
    assert "medbench/schemas/leaderboard-v2.schema.json" in names  # the leaderboard format
    assert {"medbench/_builtin/leaderboards/published/cj21-table1.json",
            "medbench/_builtin/leaderboards/published/rz19-table2.json"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "medbench = medbench.cli:main" in entry_points


def test_installed_wheel_finds_its_tasks(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    pip("install", "--no-deps", "--target", str(site), str(wheel))
    code = ("import medbench, json; from medbench.spec.catalog import Catalog; c = Catalog(); "
            "from medbench.board.published import published_for; from medbench.board.schema import schema_file; "
            "assert len(published_for({'chexpert'})) == 6 and schema_file().is_file(); "
            "print(json.dumps([medbench.__file__, c.suite_tasks('smoke')]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    path, tasks = json.loads(proc.stdout)
    assert path.startswith(str(site))  # the installed copy, not the source tree
    assert tasks[0] == "smoke-cxr" and len(tasks) == 6


PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "medbench-toy-plugin"
version = "0.1"

[project.entry-points."medbench.backbones"]
toy-net = "medbench_toy_plugin:TOY"
toy-callable = "medbench_toy_plugin:build"
toy-broken = "medbench_toy_plugin.not_shipped:build"

[project.entry-points."medbench.tasks"]
toy = "medbench_toy_plugin:tasks_dir"

[tool.setuptools]
packages = ["medbench_toy_plugin"]

[tool.setuptools.package-data]
medbench_toy_plugin = ["tasks/*.yaml"]
"""

PLUGIN_INIT = '''
"""A third-party backbone and task, registered through medbench's entry points."""
from pathlib import Path

from torch import nn

from medbench.backbones import Backbone


class ToyNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))

    def get_classifier(self):
        return self.fc


def build(*, num_classes: int, in_chans: int) -> nn.Module:
    """A two-layer toy network."""
    return ToyNet(num_classes, in_chans)


TOY = Backbone(name="toy-net", build=build, family="toy", pretraining="none", params=480 + 32,
               description="toy network from a plug-in")


def tasks_dir() -> Path:
    return Path(__file__).parent / "tasks"
'''

PLUGIN_TASK = """
task: toy-task
version: 7
family: toy
dataset: {name: smoke, adapter: synthetic, options: {family: tb, n_patients: 60, image_size: 24}}
type: binary
labels: [tuberculosis]
input: {resize: 24, crop: 20, channels: 1}
hyperrule: {batch_size: 8, schedule: [1, 2, 3, 4, 5]}
default_seeds: 1
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("plugin-src")
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    pkg = src / "medbench_toy_plugin"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN_INIT))
    (pkg / "tasks" / "toy-task.yaml").write_text(PLUGIN_TASK)
    site = tmp_path_factory.mktemp("plugin-site")
    pip("install", "--no-deps", "--no-build-isolation", "--target", str(site), str(src))
    return site


def test_plugin_backbone_is_listed_and_trains(plugin_site: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    listed = {b["name"]: b for b in json.loads(run_cli("list", "backbones", "--json", env=env).stdout)}
    assert listed["toy-net"]["source"] == "entry point medbench-toy-plugin"
    assert listed["toy-net"]["family"] == "toy" and listed["toy-callable"]["family"] == "third-party"
    tasks = {t["name"]: t for t in json.loads(run_cli("list", "tasks", "--json", env=env).stdout)}
    assert tasks["toy-task"]["source"] == "entry point medbench-toy-plugin"

    proc = run_cli("run", "--backbone", "toy-net", "--task", "toy-task", "--task", "smoke-tb", "--seeds", "1",
                   "--max-steps", "3", "--out", str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert {(e["task"], e["backbone"]) for e in board["entries"]} == {("toy-task", "toy-net"), ("smoke-tb", "toy-net")}
    assert next(e for e in board["entries"] if e["task"] == "toy-task")["provenance"]["task_version"] == 7


def test_broken_plugin_entry_point_warns_and_the_rest_work(plugin_site: Path) -> None:
    """An installed distribution with one broken entry point: one warning line, its other plug-ins listed;
    asking for the broken one by name is a one-line error naming the entry point and the import error."""
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("list", "backbones", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    names = {b["name"] for b in json.loads(proc.stdout)}
    assert {"toy-net", "toy-callable", "cbr-tiny"} <= names and "toy-broken" not in names
    assert proc.stderr.splitlines() == [
        "medbench: warning: entry point 'toy-broken' (medbench.backbones = 'medbench_toy_plugin.not_shipped:build' "
        "of medbench-toy-plugin) failed to load: ModuleNotFoundError: No module named "
        "'medbench_toy_plugin.not_shipped'; skipped"]
    proc = run_cli("run", "--backbone", "toy-broken", "--task", "toy-task", "--dry-run", env=env)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("medbench: error: --backbone: backbone 'toy-broken' comes from a plug-in that does not "
                           "load: entry point 'toy-broken'")
    assert line.endswith("No module named 'medbench_toy_plugin.not_shipped'")

