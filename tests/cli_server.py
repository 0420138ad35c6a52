"""``medbench ARGS`` in a process of its own, without paying Python's and torch's start-up for every command.

A ``python -m medbench.cli run ...`` spends most of a short test run importing torch, scipy, scikit-learn,
polars and matplotlib (about 10 s of CPU of the 18 s a 4-step run takes). The tests run the command line
about a hundred times, so :func:`conftest.run_cli` sends each command to a server instead: one process per
pytest worker that has imported those libraries once and then **forks** a child per command. The child is
a process of its own, as a subprocess is: it gets the command's environment (replaced whole), working
directory, arguments, its own stdout and stderr (files read back as text, as ``subprocess.run(text=True)``
does), stdin from /dev/null, fresh ``random``/NumPy seeds, exit code (``sys.exit``, a signal as a negative
code) and atexit handlers; it runs ``python -m medbench.cli`` (``runpy``) exactly as the interpreter would.
What it shares with its siblings is what was imported before the fork: modules that read no variable the
command may change (see :data:`FORKABLE_ENV`). The server never runs torch code before forking (an OpenMP
or CUDA runtime started in a parent is not usable in a forked child).

Not for a test that is about the interpreter or the import-time environment: those call
``run_cli(..., fresh=True)`` (or ``subprocess`` directly), and ``run_cli`` starts a fresh interpreter itself
whenever the command's environment changes a variable outside :data:`FORKABLE_ENV` (``PYTHONPATH``,
``HF_*``, ...). ``MEDBENCH_TEST_FRESH_CLI=1`` runs every command in a fresh interpreter (to compare).

Protocol (one request at a time, per worker): a JSON line on the server's stdin, ``{"args", "env", "cwd",
"stdout", "stderr"}``; the server answers on its stdout ``{"pid": N}`` after the fork, then ``{"returncode":
N}`` when the child has exited.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: variables a command may set differently from the server's environment and still be forked: read only at
#: run time (medbench reads its MEDBENCH_* variables inside functions; torch.distributed reads the process
#: group variables when a group is made; PATH is searched when a program is started; pytest names the
#: running test in PYTEST_CURRENT_TEST)
FORKABLE_ENV = re.compile(
    r"^(MEDBENCH_\w+|RANK|WORLD_SIZE|LOCAL_RANK|MASTER_ADDR|MASTER_PORT|PATH|PYTEST_CURRENT_TEST)$")

#: imported once by the server: the libraries ``medbench run`` imports, none of them reading a variable outside
#: FORKABLE_ENV or starting a thread at import (checked in :func:`serve`). Not polars (nor the medbench modules
#: that import it): its thread pool starts at import, and a forked child would wait on threads it does not have
#: (medbench's own modules take a fraction of a second to import)
PRELOAD = ("torch", "torch._inductor", "torch.distributed", "scipy.stats", "scipy.optimize", "sklearn.metrics",
           "pandas", "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "PIL.Image", "yaml",
           "rich.console", "typer", "timm", "medbench.cli.app")

#: imported first: the OpenBLAS builds of NumPy and SciPy start their thread pools at import and stop them
#: around a fork (pthread_atfork), as every program that forks after importing NumPy relies on
BLAS = ("numpy", "scipy.linalg")


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


# ---------------------------------------------------------------------------------------------- server side


def _child(request: dict, reply_fd: int) -> None:
    """In the forked child: become ``python -m medbench.cli ARGS``; never returns."""
    code = 1
    try:
        os.close(reply_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        sys.path[0] = os.getcwd()  # as ``python -m`` has it
        import random

        random.seed()
        import numpy

        numpy.random.seed()
        import runpy

        sys.argv = ["medbench", *request["args"]]
        try:
            runpy.run_module("medbench.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            if stop.code is None:
                code = 0
            elif isinstance(stop.code, int):
                code = stop.code
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # a failure of the set-up itself: say so on the child's stderr
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


def serve() -> None:
    """The server's loop: preload, then fork a child per request line on stdin."""
    reply_fd = os.dup(1)  # answers go here; fd 1 itself is free for the children
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    sys.path[0] = os.getcwd()
    import torch  # imports no CUDA runtime: the children may still use a GPU

    if torch.version.cuda is None and torch.version.hip is None:
        # a CPU-only torch: medbench's prepare_environment sets this before importing DeepSpeed; the import
        # then probes no device (with a GPU build DeepSpeed is left to the child, to keep CUDA out of here)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        preload = (*PRELOAD, "deepspeed")
    else:
        preload = PRELOAD
    import importlib

    for name in BLAS:
        importlib.import_module(name)
    blas_threads = _native_threads()
    for name in preload:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:  # a module moved: the child imports what it needs itself
            pass
    import threading

    assert threading.active_count() == 1, f"a preloaded module started a thread: {threading.enumerate()}"
    extra = _native_threads() - blas_threads
    assert extra == 0, f"a preloaded module started {extra} native thread(s) (polars?): forking would lose them"
    assert "polars" not in sys.modules, "polars was preloaded: its thread pool would be lost in the children"
    os.write(reply_fd, b'{"ready": true}\n')
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, reply_fd)
        os.write(reply_fd, (json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        os.write(reply_fd, (json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


# ---------------------------------------------------------------------------------------------- client side


class CliServer:
    """The server of one pytest worker, started on first use with the environment and directory it has then."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=self.env, cwd=cwd, text=True, bufsize=1)
        self._expect("ready", timeout=600)

    def forkable(self, env: dict[str, str]) -> bool:
        """Whether a command with ``env`` sees the same modules as in a fresh interpreter."""
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return all(FORKABLE_ENV.match(k) for k in changed)

    def _expect(self, key: str, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(key)
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the CLI server ended (exit {self.proc.wait()})")
            return json.loads(line)[key]

    def run(self, args: list[str], env: dict[str, str], cwd: Path | None, timeout: float
            ) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="medbench-cli-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"args": list(args), "env": env, "cwd": str(cwd or os.getcwd()), "stdout": str(out),
                       "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._expect("pid", timeout=60)
            try:
                code = self._expect("returncode", timeout=timeout)
            except TimeoutError:
                os.kill(pid, 9)
                self._expect("returncode", timeout=60)
                raise subprocess.TimeoutExpired([sys.executable, "-m", "medbench.cli", *args], timeout) from None
            # text as subprocess.run(text=True) reads it: the locale's encoding, universal newlines
            stdout, stderr = (p.read_text() if p.exists() else "" for p in (out, err))
        return subprocess.CompletedProcess([sys.executable, "-m", "medbench.cli", *args], code, stdout, stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    serve()
