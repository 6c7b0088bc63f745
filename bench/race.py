"""``python -m bench race ARGS...``: runs ``sparsetrain race ARGS...``, which writes its own results.

A thin hook: the race lives in the library (``sparsetrain.race``); where this
checkout has none, it says so in one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib.util

from .options import BenchError


def run(args: argparse.Namespace) -> int:
    """Run ``sparsetrain race`` with ``args.passthrough``; its exit code (it
    reports its own errors, in one line). Nothing to write here."""
    if importlib.util.find_spec("sparsetrain.race") is None:
        raise BenchError("sparsetrain.race is not in this checkout, so there is no race to run")
    from sparsetrain.cli import main as sparsetrain_main

    return sparsetrain_main(["race", *args.passthrough])
