"""The options every suite shares, and the parsers of the option values the suites share."""

from __future__ import annotations

import argparse
from typing import Any

import torch

# Shared options: each suite names the ones it takes, with its defaults (a
# default may be a {"cuda": ..., "cpu": ...} pair); any other one given is refused.
SHARED_HELP = {
    "out": "where the JSON goes: a .json file, or a folder for <suite>_<what>_<device>.json (default bench/results)",
    "repeats": "timed samples of each variant",
    "warmup": "untimed calls of each variant before the first timed one",
    "shapes": "comma list of named shapes ('NAME', or 'BENCH:NAME' for one bench of the suite); 'list' prints them",
    "compile": "torch.compile the models",
    "heat_seconds": "on CUDA, run matmuls this long after priming and before timing, so no variant starts on a cool GPU",
}


class BenchError(Exception):
    """Bad input or an unsupported combination: one line, exit code 2."""


def shared_parser(defaults: dict[str, Any], meaning: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The shared options, all defaulting to None (the suite's ``defaults`` apply;
    the help says which, and which options the suite does not take).
    ``meaning``: the suite's own help text for an option, where it reads it its own way."""
    def text(name: str) -> str:
        base = (meaning or {}).get(name, SHARED_HELP[name])
        if name == "out":
            return base
        if name not in defaults:
            return base + " (not taken by this suite)"
        d = defaults[name]
        shown = f"{d['cuda']} on CUDA, {d['cpu']} on the CPU" if isinstance(d, dict) else ("the default shapes" if d == "" else d)
        return f"{base} (default: {shown})"

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("shared options")
    g.add_argument("--out", metavar="PATH", help=text("out"))
    g.add_argument("--repeats", type=int, metavar="N", help=text("repeats"))
    g.add_argument("--warmup", type=int, metavar="N", help=text("warmup"))
    g.add_argument("--shapes", metavar="LIST", help=text("shapes"))
    g.add_argument("--compile", action="store_true", default=None, help=text("compile"))
    g.add_argument("--heat-seconds", type=float, metavar="S", help=text("heat_seconds"))
    return p


def apply_shared_defaults(args: argparse.Namespace, suite: str, defaults: dict[str, Any]) -> None:
    """Fill the shared options the user left out from the suite's ``defaults``;
    refuse, naming it, a shared option the suite does not take."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in SHARED_HELP:
        if name == "out":
            continue
        given = getattr(args, name)
        if name not in defaults:
            if given is not None:
                raise BenchError(f"{suite}: --{name.replace('_', '-')} does not apply to this suite")
            continue
        if given is None:
            default = defaults[name]
            setattr(args, name, default[device] if isinstance(default, dict) else default)
    for name in ("repeats", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "repeats" else 0):
            raise BenchError(f"--{name} must be >= {1 if name == 'repeats' else 0}, got {value}")
    if args.heat_seconds is not None and args.heat_seconds < 0:
        raise BenchError(f"--heat-seconds must be >= 0, got {args.heat_seconds}")


def parse_cases(spec: str, shapes: dict[str, dict[str, Any]], default: list[str]) -> list[tuple[str, str]]:
    """``--shapes`` as ``(bench, shape)`` pairs, in the order given. ``shapes``:
    bench name -> its named shapes; an entry is ``BENCH:SHAPE`` (that bench at
    that shape), ``SHAPE`` (every bench that has a shape of that name) or
    ``BENCH`` (that bench at its shapes in ``default``); ``default`` holds
    ``BENCH:SHAPE`` entries and is used when ``spec`` is empty."""
    entries = [e.strip() for e in (spec or ",".join(default)).split(",") if e.strip()]
    cases: list[tuple[str, str]] = []
    for entry in entries:
        bench, _, shape = entry.partition(":")
        if shape:
            if bench not in shapes:
                raise BenchError(f"--shapes {entry}: no bench {bench!r} here (benches: {', '.join(shapes)})")
            if shape not in shapes[bench]:
                raise BenchError(f"--shapes {entry}: {bench} has no shape {shape!r} (shapes: {', '.join(shapes[bench])})")
            found = [(bench, shape)]
        elif entry in shapes:
            found = [tuple(d.split(":", 1)) for d in default if d.split(":", 1)[0] == entry]  # type: ignore[misc]
        else:
            found = [(b, entry) for b in shapes if entry in shapes[b]]
            if not found:
                names = sorted({s for b in shapes.values() for s in b})
                raise BenchError(f"--shapes {entry}: no bench or shape of that name (shapes: {', '.join(names)})")
        cases += [c for c in found if c not in cases]
    return cases


def describe_shapes(shapes: dict[str, dict[str, Any]], default: list[str]) -> str:
    """The ``--shapes list`` text: every bench's named shapes, the defaults marked."""
    lines = []
    for bench, named in shapes.items():
        for name, shape in named.items():
            mark = "*" if f"{bench}:{name}" in default else " "
            lines.append(f"{mark} {bench}:{name:<12} {shape}")
    return "\n".join(lines + ["(* = run by default)"])


def _value(v: str) -> Any:
    """A ``key=value`` value as a Python value: ``True``/``False``, an int, a float, else the string."""
    if v in ("True", "False"):
        return v == "True"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def parse_overrides(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"a:ffn=relu2;b:d_model=4096,n_head=32"`` -> ``[(entry, name, overrides), ...]``
    (the ``--runs`` value of the trainer and quality suites); values parsed as
    bools, ints and floats where they read as one."""
    out = []
    for entry in filter(None, spec.split(";")):
        name, _, extra = entry.partition(":")
        pairs = [kv.split("=", 1) for kv in filter(None, extra.split(","))]
        if any(len(kv) != 2 for kv in pairs):
            raise BenchError(f"--runs entry {entry!r}: overrides are key=value pairs separated by ','")
        out.append((entry, name, {k: _value(v) for k, v in pairs}))
    return out
