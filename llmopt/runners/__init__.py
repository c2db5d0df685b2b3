"""Runners: how an artifact is loaded and scored. Heavy imports happen inside ``load_runner``."""

from llmopt.runners.base import Runner, load_runner

__all__ = ["Runner", "load_runner"]
