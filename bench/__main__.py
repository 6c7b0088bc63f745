"""``python -m bench SUITE [options]``: run one suite, write its JSON, print its table."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import NoReturn

from sparsetrain.errors import SparsetrainError

from .options import BenchError, apply_shared_defaults, shared_parser
from .results import format_table, git_state, output_path, run_document, validate

SUITES = {
    "kernels": "fused kernels against their plain-torch references (loss, RoPE, scoring, 2:4, BK, attention)",
    "steps": "whole training steps, dense against Collider, 2:4 and BK at named shapes (--headline: the three headline figures)",
    "trainer": "the trainer's own tokens/s, runs primed, the GPU heated, in ABBA order",
    "quality": "val loss against controls at equal steps or equal wall-clock",
    "gradient_error": "each token selection's gradient against dense's on one batch: bias, variance, cosine",
    "hf": "a Hugging Face Llama-family training step, dense HF (compiled) against Collider, full fine-tuning and LoRA",
    "hf_trainer": "the Hugging Face Trainer's own step time: Trainer against ColliderTrainer, eager and with cuda_graph",
    "race": "delegates to `sparsetrain race`",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def usage() -> str:
    width = max(map(len, SUITES))
    return "usage: python -m bench SUITE [options]   (python -m bench SUITE --help)\n" + "\n".join(
        f"  {name:<{width}}  {text}" for name, text in SUITES.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in SUITES:
        sys.stderr.write(f"python -m bench: error: no suite {name!r} (suites: {', '.join(SUITES)})\n")
        return 2
    suite = importlib.import_module(f"bench.{name}")
    shared = getattr(suite, "SHARED_DEFAULTS", None)
    if shared is None:  # a delegating suite: its arguments pass through, and it writes its own output
        args = argparse.Namespace(passthrough=argv[1:])
    else:
        parser = _Parser(prog=f"python -m bench {name}", description=SUITES[name], parents=[shared_parser(shared, getattr(suite, "SHARED_MEANING", None))])
        suite.add_arguments(parser)
        args = parser.parse_args(argv[1:])
    try:
        if shared is None:  # its exit code is the run's
            return int(suite.run(args) or 0)
        git_state()  # a bad commit variable is refused before anything runs
        apply_shared_defaults(args, name, shared)
        path = output_path(args.out, name, suite.file_label(args))

        def write(results: list) -> dict:
            settings = {k: v for k, v in vars(args).items() if k != "save_partial"}
            doc = run_document(name, results, settings, argv)
            problems = validate(doc)
            if problems:  # a bug in the suite, not in the input
                raise RuntimeError(f"{name} produced a run file outside the schema: {problems[:3]}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1, default=str))
            return doc

        args.save_partial = write  # suites save after each shape, so a run cut short keeps what it measured
        doc = write(suite.run(args))
    except (BenchError, SparsetrainError) as e:  # bad input: one line
        sys.stderr.write(f"python -m bench {name}: error: {e}\n")
        return 2
    print(format_table(doc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
