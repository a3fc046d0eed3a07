"""The ``datafree`` command line: parse, call the library, print.

Every user-facing failure is a ``UserError`` from the library, or a bad option
click finds; here it becomes one line on stderr and exit code 2.  Commands live
beside the library they drive and are registered at the bottom of this file.
"""

from __future__ import annotations

import sys

import click

from .errors import UserError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except click.UsageError as exc:   # a bad option too: one line, not click's three
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{where}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="datafree")
def main() -> None:
    """Make ONNX models small and fast for edge devices, without any data."""


def _register() -> None:
    from .cli_compress import compress, convert_and_compress

    main.add_command(compress)
    main.add_command(convert_and_compress)
    from .cli_run import retarget, run
    main.add_command(run)
    main.add_command(retarget)
    from .cli_report import report, targets
    main.add_command(report)
    main.add_command(targets)


_register()
