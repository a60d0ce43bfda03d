"""`fxdrop`: each command parses its options, calls one library function, and renders the result."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

import fxdrop
from fxdrop.report import inspect_model

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train CNNs faster by dropping the layers that have stopped learning (Learn&Drop on torch.fx).",
)
console = Console()
if not console.is_terminal:
    console.width = max(console.width, 160)  # reason: piped tables stay readable, not folded to 80 columns
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """fxdrop: Learn&Drop layer dropping for any timm/torchvision CNN or nn.Module."""


@app.command()
def inspect(
    model: str = typer.Argument(..., help="timm:NAME, torchvision:NAME or path/to/file.py:FACTORY"),
    img_size: Optional[int] = typer.Option(None, help="input size in pixels (default: the model's own)"),
    as_json: bool = typer.Option(False, "--json", help="print the cut points as a JSON list"),
) -> None:
    """List a model's cut points: shape, MB per sample, prefix FLOPs, trainable parameters."""
    report = inspect_model(model, img_size)
    rows = report.rows()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"{report.spec} at {report.img_size}px: {len(rows)} cut points, "
                  f"{report.total_flops / 1e9:.2f} GFLOPs/sample, {report.total_params / 1e6:.1f} M params")
    for col in ("#", "node", "module", "shape", "MB fp32", "MB bf16", "prefix FLOPs", "trainable params"):
        table.add_column(col, justify="right" if col not in ("node", "module") else "left")
    for r in rows:
        mb = r["bytes_per_sample"] / 2**20
        table.add_row(
            str(r["index"]), r["name"], r["module"] or "(top)", "x".join(map(str, r["shape"])),
            f"{mb:.3f}", f"{mb / 2:.3f}", f"{100 * r['prefix_flops_fraction']:.1f}%", f"{r['suffix_params']:,}",
        )
    console.print(table)


def main() -> None:
    """Entry point: user errors become one red line and exit code 1 (traceback with FXDROP_DEBUG=1)."""
    try:
        app()
    except fxdrop.FxdropError as exc:
        if os.environ.get("FXDROP_DEBUG") == "1":
            raise
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
