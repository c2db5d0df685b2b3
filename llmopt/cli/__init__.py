"""The ``llmopt`` command. Each command parses, calls one library function, renders."""

from llmopt.cli.main import app, main

__all__ = ["app", "main"]
