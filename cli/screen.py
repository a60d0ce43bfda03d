"""Where the commands write: the screen (stdout) and the error stream."""

from __future__ import annotations

from rich.console import Console

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 160)  # piped tables stay readable, not folded to 80 columns
err_console = Console(stderr=True)
