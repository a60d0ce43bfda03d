"""How the CLI writes what a library message refers to (fxdrop.messages): a parameter as the flag
of the command being run (--cache-dir, --resume, --no-pretrained, --replay all), a function of
the API as the command that runs it (`fxdrop finetune`). Both are read from the commands' own
options and subcommands (their `params` and `commands`); a parameter the command has no option
for keeps the API's name, so no message shows a flag the command lacks."""

from __future__ import annotations

from collections.abc import Callable

import typer
import typer.core

from fxdrop.messages import Entry, Param, Ref

__all__ = ["Failed", "namer", "names"]


class Failed(Exception):
    """A library error as the command that ran into it names its references; `main` prints `line`."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


def names(ctx: typer.Context) -> Callable[[Ref], str]:
    """How the command being run in `ctx` names a reference."""
    return namer(ctx.command, ctx.find_root().command)


def namer(command: typer.core.TyperCommand, root: typer.core.TyperGroup) -> Callable[[Ref], str]:
    """How `command` (a subcommand of `root`) names a reference."""
    options = {p.name: p for p in command.params if isinstance(p, typer.core.TyperOption)}

    def name(ref: Ref) -> str:
        if isinstance(ref, Entry):
            return _command_line(ref, root) or ref.api()
        return _flag(ref, options.get(ref.name)) or ref.api()

    return name


def _long(opts: list[str]) -> str | None:
    return next((o for o in opts if o.startswith("--")), None)


def _flag(param: Param, option: typer.core.TyperOption | None) -> str | None:
    """The flag (and value) that gives `param` its value; None when `option` cannot."""
    if option is None:
        return None
    if param.value is None:
        return _long(option.opts)
    if option.is_bool_flag:  # --resume, or --pretrained/--no-pretrained
        if not isinstance(param.value, bool):
            return None
        return _long(option.opts if param.value else option.secondary_opts)
    flag = _long(option.opts)
    return f"{flag} {param.value}" if flag else None


def _command_line(entry: Entry, root: typer.core.TyperGroup) -> str | None:
    """`fxdrop WORDS` when the leading words of the entry's command line name a command of `root`."""
    words = (entry.command or entry.name).split()
    command, found = root, 0
    for word in words:
        if not isinstance(command, typer.core.TyperGroup) or word not in command.commands:
            break
        command, found = command.commands[word], found + 1
    if not found or isinstance(command, typer.core.TyperGroup):
        return None
    return f"`fxdrop {' '.join(words)}`"
