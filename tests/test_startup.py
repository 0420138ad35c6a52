"""Start-up stays light: the commands a user types first import no heavy library.

The speed itself (< 1.5 s) is measured in ``benchmarks/test_startup_bench.py``; here only what is
imported is checked, which does not depend on the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import PROCESS_GROUP_VARS, REPO

HEAVY = ("torch", "deepspeed", "timm", "polars", "sklearn", "scipy", "torchmetrics", "netcal", "fairlearn")

PROBE = """
import json, sys
sys.argv = ["medbench", *json.loads(sys.argv[1])]
from medbench.cli import main
try:
    main()
except SystemExit:
    pass
sys.stdout.flush()
print("\\nMODULES=" + json.dumps(sorted(m for m in sys.modules if "." not in m)))
"""


def imported_top_modules(args: list[str]) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES=")]
    assert line, proc.stdout + proc.stderr
    return set(json.loads(line[-1].removeprefix("MODULES=")))


@pytest.mark.parametrize("args", [["--help"], ["list", "backbones"], ["list", "tasks"], ["list", "suites"]],
                         ids=lambda a: " ".join(a))
def test_start_up_imports_no_heavy_library(args: list[str]) -> None:
    modules = imported_top_modules(args)
    assert "medbench" in modules  # the probe ran the CLI
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
