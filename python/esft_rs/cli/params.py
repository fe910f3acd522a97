"""Click parameter types and options shared by the commands: one spelling of each flag.

Old spellings (``--out``, ``--seq-len``) are still accepted as hidden aliases
(``Aliased``); ``--help`` and docs/cli.md show only the current one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from esft_rs.data import MAX_SEED

#: Seeds torch and numpy accept (a larger one overflowed inside torch.manual_seed).
SEED = click.IntRange(0, MAX_SEED)

#: Spellings of earlier versions, still accepted, hidden from ``--help``: old -> current.
HIDDEN_ALIASES = {"--out": "--output", "--seq-len": "--seq-length"}

#: How ``--chat-template`` shows its choices in every command.
CHAT_TEMPLATE_METAVAR = "auto|model|official|PATH"

DEVICE_HELP = ("torch device (cpu, cuda, cuda:1, ...); auto: this rank's GPU if there is one,"
               " else cpu.")


class Aliased(click.Option):
    """An option whose old spellings (``HIDDEN_ALIASES``) work but are not shown."""

    def _shown(self) -> list[str]:
        return [o for o in self.opts if o not in HIDDEN_ALIASES]

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts = self.opts
        self.opts = self._shown()
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts

    def get_error_hint(self, ctx: click.Context) -> str:
        return " / ".join(f"'{o}'" for o in self._shown())


def option(*decls: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``click.option`` adding the hidden old spellings of a flag that had any."""
    flags = [d for d in decls if d.startswith("-")]
    names = [d for d in decls if not d.startswith("-")]
    old = [a for a, new in HIDDEN_ALIASES.items() if new in flags]
    return click.option(*flags, *old, *names, cls=Aliased, **kw)


def output_option(help: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``-o/--output`` (old: ``--out``)."""
    name = kw.pop("name", "output")
    return option("-o", "--output", name, help=help, **kw)


def seq_length_option(help: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--seq-length`` (old: ``--seq-len``)."""
    return option("--seq-length", "seq_length", help=help, **kw)


def device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--device``, default ``auto``, the same in every command that runs a model."""
    return click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)(f)
