"""The library behind the CLI: plain functions and dataclasses, no Typer or Rich."""
