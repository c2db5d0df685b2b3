"""Runners: how an artifact is loaded and scored, found through a registry like the backends' (see ``base``).

Heavy imports happen inside ``load_runner``.
"""

from llmopt.runners.base import BaseRunner, LoadRequest, Runner, available_runners, load_runner, runner_class

__all__ = ["BaseRunner", "LoadRequest", "Runner", "available_runners", "load_runner", "runner_class"]
