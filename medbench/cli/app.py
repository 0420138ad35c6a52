"""The ``medbench`` typer application, its global options, shared option types and the entry point.

Heavy libraries (torch, deepspeed, timm, polars) are imported inside the
commands, so ``medbench --help`` and ``medbench list`` start fast. A user
error prints one line and exits with 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from enum import Enum

import typer

from medbench import __version__
from medbench.cli.console import DEBUG

app = typer.Typer(
    name="medbench",
    help="How well does this image backbone transfer to medical imaging? Fine-tune, score, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"medbench {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    DEBUG["on"] = debug or bool(os.environ.get("MEDBENCH_DEBUG"))


class EngineChoice(str, Enum):
    deepspeed = "deepspeed"
    torch = "torch"


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class LauncherChoice(str, Enum):
    inline = "inline"
    local = "local"
    slurm = "slurm"


def finite(value: float | None) -> float | None:
    """typer callback: a float option must be a finite number (``nan``/``inf`` parse as floats)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, got {value}")
    return value


TASKS_DIR_OPT = typer.Option(None, "--tasks-dir", help="Extra folder of task/suite YAML files (repeatable).")
VERIFY_PIXELS_OPT = typer.Option(
    False, "--verify-pixels", help="Key the preprocessing cache and the runs on the sha256 of every image file "
    "(read in full) instead of its size and modification time. Env: MEDBENCH_VERIFY_PIXELS=1.")
ALLOW_OUTSIDE_OPT = typer.Option(
    False, "--allow-outside-data-root", help="Let task specs and label files name absolute paths or paths "
    "outside the dataset folder (off: such paths are refused). Env: MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT=1.")


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(argument errors, aborts) of the click that typer uses (vendored since typer 0.29, or click)."""
    errors: list[type] = [t for t in (getattr(typer, "TyperException", None),) if t is not None]
    aborts: list[type] = [typer.Abort, KeyboardInterrupt]
    try:
        import click

        errors.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:  # pragma: no cover - typer vendors click
        pass
    return tuple(errors), tuple(aborts)


def main(argv: list[str] | None = None) -> None:
    """The ``medbench`` entry point: every error is one line on stderr (``--debug``: a traceback)."""
    usage_errors, aborts = _click_exception_types()
    try:
        code = app(args=argv, prog_name="medbench", standalone_mode=False)
    except usage_errors as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare ``medbench``: the help text
            err.show()
            code = err.exit_code
        else:  # typer/click's own argument errors (missing option, bad value, unknown command, ...)
            ctx = getattr(err, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            from medbench.cli.console import plain

            print(f"medbench: error: {plain(err.format_message())}{where}", file=sys.stderr)
            code = getattr(err, "exit_code", 2) or 2
    except aborts:
        print("medbench: interrupted; completed runs are kept", file=sys.stderr)
        code = 130
    except Exception as err:  # an error outside the commands' own handling: still one line
        if DEBUG["on"]:
            raise
        from medbench.cli.console import plain

        print(f"medbench: error: unexpected {type(err).__name__}: {plain(err)} "
              "(--debug shows the traceback)", file=sys.stderr)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)

