"""The ``esft-rs`` command line.

Each command lives in its own module and imports torch (if at all) inside its
function body, so ``esft-rs --help`` and byte-level commands start fast.
Bad input (``EsftError``/``OSError``, a bad option) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TextIO

import click

from esft_rs import __version__
from esft_rs.cli.demo_cmd import demo_cmd
from esft_rs.cli.eval_cmd import eval_cmd
from esft_rs.cli.export_cmd import export_cmd
from esft_rs.cli.inspect_cmd import inspect_cmd
from esft_rs.cli.merge_cmd import merge_cmd, split_cmd
from esft_rs.cli.model_cmd import init_model_cmd
from esft_rs.cli.plan_cmd import plan_cmd
from esft_rs.cli.profile_cmd import profile_cmd
from esft_rs.cli.routing_cmd import routing_report_cmd, select_cmd
from esft_rs.cli.train_cmd import train_cmd
from esft_rs.errors import EsftError, from_cli
from esft_rs.files.inputs import describe_text_problem


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="esft-rs")
def main() -> None:
    """Expert-Specialized Fine-Tuning (ESFT) for Mixture-of-Experts models.

    Profile routing on task data, select the experts a task uses, train only
    those, and merge the resulting adapter into the base checkpoint.
    """


main.add_command(inspect_cmd)
main.add_command(demo_cmd)
main.add_command(train_cmd)
main.add_command(init_model_cmd)
main.add_command(select_cmd)
main.add_command(routing_report_cmd)
main.add_command(merge_cmd)
main.add_command(split_cmd)
main.add_command(export_cmd)
main.add_command(profile_cmd)
main.add_command(eval_cmd)
main.add_command(plan_cmd)


def fail(message: str) -> None:
    """Print one error line and exit with code 2 (bad input)."""
    click.echo(f"esft-rs: error: {' '.join(message.split())}", err=True)
    sys.exit(2)


def run() -> None:
    """Entry point: run the CLI, turning bad input into one line and exit code 2; messages
    name the flags that fix a problem (``esft_rs.errors.option``)."""
    with from_cli():
        _run()


#: The package's own files: warnings raised there are ours to word.
_PACKAGE = Path(__file__).resolve().parent.parent
_python_warning = warnings.showwarning


def _warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
    """Our own warnings as one line, as errors are; other packages' as Python shows them."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        click.echo(f"esft-rs: warning: {' '.join(str(message).split())}", err=True)
    else:
        _python_warning(message, category, filename, lineno, file, line)


def _run() -> None:
    warnings.showwarning = _warning
    for arg in sys.argv[1:]:
        # Bytes that are not UTF-8 arrive as lone surrogates, which no file format can hold.
        if describe_text_problem(arg) is not None:
            fail(f"argument {arg!r} is not valid UTF-8")
    try:
        code = main.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:  # a bad option or argument: one line too
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        fail(f"{e.format_message()}{hint}")
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except EsftError as e:
        fail(str(e))
    except OSError as e:  # "FILE: what", as EsftIOError says it, not "[Errno 2] what: 'FILE'"
        fail(f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else str(e))
    except RecursionError:  # a parser below us met nesting it could not follow
        fail("input nested too deeply to read")
    code = code if isinstance(code, int) else 0
    if (group := sys.modules.get("esft_rs.distributed")) is not None:  # torch is loaded
        group.exit_process(code)
    sys.exit(code)
