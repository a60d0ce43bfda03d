"""Library messages carry the parameters they name as data (fxdrop.messages); the API writes them
as `cache_dir`, each CLI command as its own flag, read from its options, and never as a flag the
command lacks."""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import typer
from helpers import run_cli
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import fxdrop
from fxdrop import errors
from fxdrop.cache import CacheStore
from fxdrop.config import FitConfig
from fxdrop.messages import Entry, Message, Param
from fxdrop_cli import main as cli
from fxdrop_cli.flags import namer

_FLAG = re.compile(r"--[a-z][a-z-]*")
_ROOT = typer.main.get_command(cli.app)


def _commands() -> dict[str, typer.core.TyperCommand]:
    """Every command of the CLI by its command line ("finetune", "data export")."""
    found, todo = {}, [("", _ROOT)]
    while todo:
        words, group = todo.pop()
        for name, command in group.commands.items():
            line = f"{words} {name}".strip()
            if isinstance(command, typer.core.TyperGroup):
                todo.append((line, command))
            else:
                found[line] = command
    return found


_COMMANDS = _commands()


def _help_flags(line: str) -> set[str]:
    """The flags `fxdrop LINE --help` lists: what the user sees, read apart from the namer."""
    shown = CliRunner().invoke(cli.app, [*line.split(), "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    return set(_FLAG.findall(shown.output))


# ---- every message of the library that names a parameter, collected from the source ----------------

_MAKERS = {"Message", *errors.__all__}  # what builds a message: Message and the error classes
_STAND_IN = "<value>"  # a value known only when the message is raised


def _value(node: ast.expr, module: object) -> object:
    """A message's value as far as the source says: a reference built from literals, a module's
    constant reference, or a stand-in."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Param", "Entry"):
        args = []
        for a in node.args:
            try:
                args.append(ast.literal_eval(a))
            except ValueError:
                args.append(_STAND_IN)
        kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return (Param if node.func.id == "Param" else Entry)(*args, **kw)
    if isinstance(node, ast.Name) and isinstance(getattr(module, node.id, None), (Param, Entry, Message)):
        return getattr(module, node.id)
    return _STAND_IN


def _text(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return "<text>"  # an f-string: a message without references, its values already in it


def _library_messages() -> list[tuple[str, Message]]:
    """(where, message) for every message fxdrop/ builds that names a parameter or a function:
    each call of Message or of an error class with references among its values, each ConfigError
    (its field; a field the code computes is tried as every FitConfig field)."""
    found = []
    root = Path(fxdrop.__file__).parent
    for path in sorted(root.rglob("*.py")):
        name = ".".join(("fxdrop", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        module = importlib.import_module(name)  # its constant references (runs._OVERWRITE, ...)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _MAKERS
            ):
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            values = {k.arg: _value(k.value, module) for k in node.keywords if k.arg}
            if node.func.id == "ConfigError":
                field = node.args[0]
                names = (
                    [field.value] if isinstance(field, ast.Constant) else [f.name for f in fields(FitConfig)]
                )
                problem = _text(node.args[1]) if len(node.args) > 1 else _text(node.keywords[0].value)
                found += [(where, errors.ConfigError(n, problem, **values).message) for n in names]
            elif node.args:
                message = Message(_text(node.args[0]), **values)
                if message.refs:
                    found.append((where, message))
    return found


_MESSAGES = _library_messages()


def test_the_messages_found_are_the_librarys_own():
    """The scan finds messages the library raises (it is not vacuous): those of the run folder,
    the cache, the model's weights and the update."""
    named = {ref.name for _, m in _MESSAGES for ref in m.refs}
    assert {
        "overwrite",
        "resume",
        "cache_dir",
        "weights",
        "pretrained",
        "replay",
        "model_file",
        "lr",
    } <= named
    assert {"finetune", "inspection.inspect_model", "run_report"} <= named
    assert len(_MESSAGES) > 60  # every ConfigError field counts, FitConfig's computed ones included


@pytest.mark.parametrize("line", sorted(_COMMANDS))
def test_no_library_message_shows_a_flag_the_command_lacks(line):
    command = _COMMANDS[line]
    flags = _help_flags(line)
    options = {p.name: p for p in command.params if isinstance(p, typer.core.TyperOption)}
    name = namer(command, _ROOT)
    for where, message in _MESSAGES:
        shown = message.render(name)
        assert set(_FLAG.findall(shown)) <= flags, (line, where, shown)
        for ref in message.refs:  # a parameter the command has an option for is shown as its flag
            if isinstance(ref, Param) and ref.name in options and ref.value in (None, True):
                flag = next(o for o in options[ref.name].opts if o.startswith("--"))
                assert flag in shown and ref.api() not in shown, (line, where, shown)


def test_no_message_names_a_parameter_in_prose():
    """A backticked name that is an option of some command is a reference, never text: the
    library's message templates and plain messages hold none."""
    options = {p.name for c in _COMMANDS.values() for p in c.params if isinstance(p, typer.core.TyperOption)}
    root = Path(fxdrop.__file__).parent
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _MAKERS:
                for arg in node.args:
                    parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
                    text = "".join(
                        p.value for p in parts if isinstance(p, ast.Constant) and isinstance(p.value, str)
                    )
                    prose = {m for m in re.findall(r"`([a-z_]+)(?:=\w+)?`", text) if m in options}
                    assert not prose, (path.name, node.lineno, text)


# ---- the API and each command write one reference their own way ------------------------------------


def test_a_cache_path_that_is_a_file_is_cache_dir_in_the_api_and_flag_or_name_on_the_command_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(fxdrop.CacheError) as caught:
        CacheStore.check_root(tmp_path / "file")
    assert str(caught.value).startswith("`cache_dir` '") and str(tmp_path / "file") in str(caught.value)
    message = caught.value.message
    on = {line: message.render(namer(_COMMANDS[line], _ROOT)) for line in ("finetune", "update", "inspect")}
    assert on["finetune"].startswith("--cache-dir '")
    assert on["update"] == on["inspect"] == str(caught.value)  # neither has a cache folder option


def test_a_value_asked_for_is_the_switch_or_the_option_with_its_value():
    message = Message(
        "{a} {b} {c} {d} {e}",
        a=Param("resume", True),
        b=Param("pretrained", False),
        c=Param("replay", "new"),
        d=Param("num_workers"),
        e=Param("resume", False),
    )
    assert str(message) == "`resume=True` `pretrained=False` `replay='new'` `num_workers` `resume=False`"
    on_finetune = message.render(namer(_COMMANDS["finetune"], _ROOT))
    assert on_finetune == "--resume --no-pretrained `replay='new'` --workers `resume=False`"
    on_update = message.render(namer(_COMMANDS["update"], _ROOT))
    assert on_update == "--resume `pretrained=False` --replay new --workers `resume=False`"


def test_a_function_is_its_command_where_the_cli_has_one():
    message = Message(
        "{a}; {b}; {c}",
        a=Entry("finetune"),
        b=Entry("data.export_fashion_mnist", command="data export fashion-mnist DIR"),
        c=Entry("fit"),
    )
    assert str(message) == "`fxdrop.finetune`; `fxdrop.data.export_fashion_mnist`; `fxdrop.fit`"
    assert message.render(namer(_COMMANDS["update"], _ROOT)) == (
        "`fxdrop finetune`; `fxdrop data export fashion-mnist DIR`; `fxdrop.fit`"
    )


def test_an_unknown_fit_argument_names_no_flag_on_any_command():
    with pytest.raises(fxdrop.ConfigError) as caught:
        FitConfig.from_kwargs({"fit_typo": 1})
    for line, command in _COMMANDS.items():
        shown = caught.value.message.render(namer(command, _ROOT))
        assert shown.startswith("`fit_typo` is not an argument of fit") and "--" not in shown, (line, shown)


# ---- end to end: the flags the old rewriting made up are gone ----------------------------------------


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def test_update_on_a_folder_that_is_no_run_says_run_fxdrop_finetune(tmp_path):
    (tmp_path / "images").mkdir()
    line = _one_error_line(run_cli("update", str(tmp_path), "--data", str(tmp_path / "images")))
    assert "no finished fxdrop run" in line and "run `fxdrop finetune` into it first" in line
    assert "--finetune" not in line


def test_update_of_a_run_made_by_fit_says_it_was_not_made_by_fxdrop_finetune(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 8, 8), torch.arange(8) % 2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    fxdrop.fit(model, data, data, policy=fxdrop.NoDrop(), out_dir=tmp_path / "run", epochs=1, batch_size=4)
    line = _one_error_line(run_cli("update", str(tmp_path / "run"), "--data", str(tmp_path)))
    assert "was not made by `fxdrop finetune`" in line and "--finetune" not in line


def test_a_finetune_option_error_names_the_flag(tmp_path):
    proc = run_cli(
        "finetune", "timm:resnet18", "-d", "fashion-mnist", "-o", str(tmp_path / "o"), "--cache-memory", "x"
    )
    assert _one_error_line(proc).startswith("error: --cache-memory must be a size")


def test_a_warning_names_the_flag_of_the_command_that_shows_it():
    proc = run_cli("inspect", "timm:resnet18", "--img-size", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --img-size 16 is below timm:resnet18's downsampling (32x)" in proc.stderr, proc.stderr
