"""The `fxdrop` command (typer + rich). Installed as `fxdrop_cli`."""
