"""The `multiconcept` command: one module per verb, registered here in one place.

Every UserError and every usage error (unknown option or verb, a bad or
missing value) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from ..errors import UserError
from . import (
    bake,
    benchmark,
    compose,
    convert,
    dataset,
    demo,
    evaluate,
    export,
    generate,
    inspect,
    learn,
    methods,
    toyworld,
    train_encoder,
    ui,
)
from .app import app
from .options import err

for verb in (learn.learn, generate.generate, inspect.inspect, export.export, methods.methods, demo.demo,
             evaluate.evaluate, benchmark.benchmark, train_encoder.train_encoder, compose.compose,
             convert.convert_fastcomposer, bake.bake, ui.ui):
    app.command()(verb)
app.add_typer(toyworld.app, name="toyworld")
app.add_typer(dataset.app, name="dataset")


def _click_errors() -> tuple[type, type]:
    """click's UsageError and ClickException, from wherever this typer takes click
    (typer >= 0.29 vendors its own copy, so `import click` would name other classes)."""
    mro = {c.__name__: c for c in typer.BadParameter.__mro__}
    return mro["UsageError"], mro["ClickException"]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"error: {' '.join(message.split())}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    usage_error, click_error = _click_errors()
    try:
        app(args=argv, prog_name="multiconcept", standalone_mode=False)
    except UserError as e:
        _fail(str(e))
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # typer has printed the help already
            sys.exit(0)
        where = e.ctx.command_path if e.ctx is not None else "multiconcept"
        _fail(f"{e.format_message()} (see `{where} --help`)")
    except click_error as e:
        _fail(e.format_message())
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        # the machine's answer (a full disk, a folder we may not write), not a bug of ours
        _fail(f"{e.strerror or e} ({e.filename}): free space or fix the permissions" if e.filename else str(e))
