"""Messages that name a parameter or a function of fxdrop's API by reference, not in prose.

A :class:`Message` is a template with `{name}` fields and the values that fill them. A value that
is a :class:`Param` (a keyword argument: `cache_dir`, `resume=True`) or an :class:`Entry` (a
function: `finetune`) is written by whoever shows the message, each front end its own way: the
API as `cache_dir` and `resume=True` (`str(message)`), the CLI as the flag of the command being
run (--cache-dir, --resume), from that command's own options. The library never guesses how a
front end spells a parameter, and no front end parses prose for one.

Example:
    >>> m = Message("'{root}' is a file; choose another {cache_dir}", root="/tmp/x", cache_dir=Param("cache_dir"))
    >>> str(m)
    "'/tmp/x' is a file; choose another `cache_dir`"
    >>> m.render(lambda ref: "--cache-dir")
    "'/tmp/x' is a file; choose another --cache-dir"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Param", "Entry", "Ref", "Message", "api_name"]


@dataclass(frozen=True)
class Param:
    """A keyword argument of fxdrop's API (of `fit`, `finetune`, `update`, `inspect_model`, ...)
    that a message names; `value` is the value the message asks for (`resume=True`), None when it
    names the argument itself."""

    name: str
    value: bool | int | float | str | None = None

    def api(self) -> str:
        return f"`{self.name}`" if self.value is None else f"`{self.name}={self.value!r}`"


@dataclass(frozen=True)
class Entry:
    """A function of fxdrop's API that a message names (`finetune`, `data.export_fashion_mnist`);
    `command` is the CLI's command that runs it ("data export"), when its name differs."""

    name: str
    command: str | None = None

    def api(self) -> str:
        return f"`fxdrop.{self.name}`"


Ref = Param | Entry


def api_name(ref: Ref) -> str:
    """How the Python API writes a reference: `cache_dir`, `resume=True`, `fxdrop.finetune`."""
    return ref.api()


class Message:
    """A template and the values of its `{name}` fields; references are written by `render`'s
    `name`. With no values the template is the text as it is (braces in it are not fields)."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values

    @property
    def refs(self) -> tuple[Ref, ...]:
        """The parameters and functions the message names (those of a message within it too)."""
        return tuple(
            r
            for v in self.values.values()
            for r in (v.refs if isinstance(v, Message) else (v,) if isinstance(v, (Param, Entry)) else ())
        )

    def render(self, name: Callable[[Ref], str] = api_name) -> str:
        """The text, each reference written by `name` (a message within it too)."""
        if not self.values:
            return self.template
        return self.template.format_map(
            {
                k: name(v)
                if isinstance(v, (Param, Entry))
                else v.render(name)
                if isinstance(v, Message)
                else v
                for k, v in self.values.items()
            }
        )

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"Message({self.render()!r})"
