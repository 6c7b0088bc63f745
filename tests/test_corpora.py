"""Regime corpora: a clean selection copied whole, noise and duplicates in the train split only,
at the fractions asked for, each noise kind as its definition says, deterministic given the seed."""

from __future__ import annotations

import ast
import base64
import builtins
import datetime
import io
import json
import random
import re
import shutil
import sysconfig
import tokenize
import warnings
import zlib
from pathlib import Path

import pytest

from sparsetrain.cli import main
from sparsetrain.corpora import (MANIFEST_NAME, MIN_DOC_BYTES, NOISE_KINDS, TRAIN_ONLY_BELOW, CorpusSpec,
                                 boilerplate_document, build_corpus, minify_python, random_document, table_document,
                                 train_only_path)
from sparsetrain.data import discover_text_files, is_val_file, read_documents, split_documents
from sparsetrain.errors import ConfigError, DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PACKAGES = ("json", "email", "concurrent", "importlib", "urllib")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Python packages (some of the standard library), plus a README and a test folder to select away."""
    root = tmp_path_factory.mktemp("src")
    for pkg in PACKAGES:
        shutil.copytree(STDLIB / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "README.txt").write_text("not python\n" * 50)
    (root / "json" / "tests").mkdir()
    (root / "json" / "tests" / "test_x.py").write_text("assert True\n" * 40)
    (root / "empty.py").write_text("  \n\n")  # whitespace only: the loader skips it, so does the build
    return root


def _spec(source: Path, out: Path, **kw) -> CorpusSpec:
    base = dict(src=str(source), out=str(out), include="*.py", exclude="*/tests/*", val_fraction=0.1, seed=3)
    return CorpusSpec(**{**base, **kw})


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _is_generated(rel: str) -> bool:
    return rel.split("/")[0] in ("noise", "duplicates")


def _source_selection(source: Path) -> dict[str, bytes]:
    """The clean files: the source's *.py outside tests/ holding more than whitespace, read independently."""
    out = {}
    for p in sorted(source.rglob("*.py")):
        rel = p.relative_to(source).as_posix()
        if "/tests/" not in "/" + rel and p.read_text(errors="replace").strip():
            out[rel] = p.read_bytes()
    return out


# ----------------------------------------------------------------------------- the build


@pytest.mark.parametrize("noise, dup", [(0.3, 0.0), (0.3, 0.2), (0.0, 0.5), (0.6, 0.1)])
def test_fractions_and_the_clean_copy(source: Path, tmp_path: Path, noise: float, dup: float) -> None:
    out = tmp_path / "corpus"
    manifest = build_corpus(_spec(source, out, noise_fraction=noise, duplicate_fraction=dup), verbose=False)
    tree = _tree(out)
    clean = _source_selection(source)
    # the clean files are copied byte for byte under their own paths, nothing else of the source
    assert {r: c for r, c in tree.items() if not _is_generated(r) and r != MANIFEST_NAME} == clean
    train_clean = sum(len(c) for r, c in clean.items() if not is_val_file(r, 0.1))
    target_total = train_clean / (1 - noise - dup)
    by_kind: dict[str, list[int]] = {}
    for rel, content in tree.items():
        if _is_generated(rel):
            kind = rel.split("/")[1] if rel.startswith("noise/") else "duplicate"
            by_kind.setdefault(kind, []).append(len(content))
    # each kind's share, filled from below: short of it by less than the smallest piece that could still fit
    for kind in (NOISE_KINDS if noise else ()):
        share, got = round(noise * target_total / len(NOISE_KINDS)), sum(by_kind[kind])
        slack = min(by_kind[kind]) if kind == "minified" else MIN_DOC_BYTES
        assert 0 <= share - got < slack, (kind, share, got)
    if dup:
        share, got = round(dup * target_total), sum(by_kind["duplicate"])
        assert 0 <= share - got < min(by_kind["duplicate"])
    else:
        assert "duplicate" not in by_kind
    if not noise:
        assert not any(r.startswith("noise/") for r in tree)
    train_bytes = train_clean + sum(sum(v) for v in by_kind.values())
    noise_bytes = sum(sum(v) for k, v in by_kind.items() if k != "duplicate")
    assert abs(noise_bytes / train_bytes - noise) < 0.01 and abs(sum(by_kind.get("duplicate", [])) / train_bytes - dup) < 0.01
    assert manifest["train_bytes"] == train_bytes
    assert manifest["measured_noise_fraction"] == pytest.approx(noise_bytes / train_bytes)
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest


def test_noise_inside_clean_files(source: Path, tmp_path: Path) -> None:
    """noise_placement inside: the same noise pieces as the file placement, each spliced at a line
    boundary of a clean train file; removing a file's spans gives its source back; no noise/ folder."""
    inside = build_corpus(_spec(source, tmp_path / "inside", noise_fraction=0.3, noise_placement="inside"),
                          verbose=False)
    files = build_corpus(_spec(source, tmp_path / "files", noise_fraction=0.3), verbose=False)
    tree, clean = _tree(tmp_path / "inside"), _source_selection(source)
    assert not any(_is_generated(rel) for rel in tree)
    assert set(tree) - {MANIFEST_NAME} == set(clean)
    mixed = {rel: meta for rel, meta in inside["generated"].items()}
    assert mixed and all(meta["kind"] == "clean" and meta["inserted"] for meta in mixed.values())
    pieces: dict[str, list[str]] = {k: [] for k in NOISE_KINDS}
    for rel, content in clean.items():
        if rel not in mixed:
            assert tree[rel] == content, rel  # untouched
            continue
        assert not is_val_file(rel, TRAIN_ONLY_BELOW), rel  # only files that are train for any val_fraction
        text, rest, pos = tree[rel].decode("utf-8", errors="replace"), [], 0
        for start, end, kind in mixed[rel]["inserted"]:
            assert pos <= start < end and (start == 0 or text[start - 1] == "\n"), (rel, start)
            assert text[end - 1] == "\n"
            rest.append(text[pos:start])
            pieces[kind].append(text[start:end])
            pos = end
        rest.append(text[pos:])
        assert "".join(rest) == content.decode("utf-8", errors="replace"), rel
    # the pieces are the file placement's noise documents (a newline added where one lacked it)
    by_kind_files = {k: sorted(tree_text.decode() if tree_text.endswith(b"\n") else tree_text.decode() + "\n"
                               for rel, tree_text in _tree(tmp_path / "files").items()
                               if rel.startswith(f"noise/{k}/"))
                     for k in NOISE_KINDS}
    for k in NOISE_KINDS:
        assert sorted(pieces[k]) == by_kind_files[k], k
        assert inside["noise"][k]["bytes"] == sum(len(p.encode()) for p in pieces[k])
        assert inside["noise"][k]["files"] == files["noise"][k]["files"]
    assert inside["noise_placement"] == "inside" and abs(inside["measured_noise_fraction"] - 0.3) < 0.02


def test_val_split_stays_clean(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    manifest = build_corpus(_spec(source, out, noise_fraction=0.3, duplicate_fraction=0.2), verbose=False)
    clean = _source_selection(source)
    generated = {r for r in _tree(out) if _is_generated(r)}
    assert generated and set(manifest["generated"]) == generated
    # the loader's own view of the folder: the manifest is not a document; the val split is the clean one
    root, files = discover_text_files(out)
    docs = read_documents(root, files)
    assert MANIFEST_NAME not in docs and set(docs) == set(clean) | generated
    for fraction in (0.1, 0.05, 0.02, 0.3, 0.49):
        val = {r for r in docs if is_val_file(r, fraction)}
        assert not val & generated, fraction  # no noise, no duplicate, whatever the val fraction
        assert val == {r for r in clean if is_val_file(r, fraction)}
    train_texts, val_texts = split_documents(docs, 0.1)
    assert val_texts == [clean[r].decode("utf-8", errors="replace") for r in sorted(clean) if is_val_file(r, 0.1)]
    # made from files that are train at the build's fraction (and so at any smaller one)
    for rel, meta in manifest["generated"].items():
        if meta["source"] is not None:
            assert not is_val_file(meta["source"], 0.1)
        if meta["kind"] == "duplicate":
            assert (out / rel).read_bytes() == clean[meta["source"]]
        assert meta["bytes"] == (out / rel).stat().st_size


def test_train_only_paths_hash_into_train() -> None:
    rng = random.Random(0)
    for _ in range(500):
        stem = "noise/x/" + "".join(rng.choice("abcdef0123") for _ in range(rng.randint(1, 12)))
        path = train_only_path(stem, ".py")
        assert path.startswith(stem) and path.endswith(".py")
        assert not is_val_file(path, 0.4999999)


def test_build_is_deterministic_given_the_seed(source: Path, tmp_path: Path) -> None:
    kw = dict(noise_fraction=0.3, duplicate_fraction=0.1)
    build_corpus(_spec(source, tmp_path / "a", **kw), verbose=False)
    build_corpus(_spec(source, tmp_path / "b", **kw), verbose=False)
    build_corpus(_spec(source, tmp_path / "c", seed=4, **kw), verbose=False)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    noise = lambda t: {r: v for r, v in t.items() if _is_generated(r)}
    assert noise(a) != noise(c)
    assert {r: v for r, v in a.items() if not _is_generated(r) and r != MANIFEST_NAME} == \
        {r: v for r, v in c.items() if not _is_generated(r) and r != MANIFEST_NAME}


def test_only_the_kinds_asked_for(source: Path, tmp_path: Path) -> None:
    manifest = build_corpus(_spec(source, tmp_path / "c", noise_fraction=0.2, noise_kinds=("table", "random")),
                            verbose=False)
    kinds = {r.split("/")[1] for r in _tree(tmp_path / "c") if r.startswith("noise/")}
    assert kinds == {"table", "random"} == set(manifest["noise"])


# ----------------------------------------------------------------------------- the noise kinds

TRICKY = '''
"""Module docstring."""
import os as _os
from collections import *
COUNTER = 0

def outer(values, scale=2):
    """A docstring."""
    # a comment
    total = 0
    squares = [value_item * value_item for value_item in values]
    def inner(extra):
        nonlocal total
        total += extra
        return total
    for position, value in enumerate(squares):
        inner(value * scale + position)
    accumulated = {key_name: len(key_name) for key_name in ("ab", "cde")}
    return total, accumulated, (lambda lam_arg: lam_arg + 1)(total)

def uses_global():
    global COUNTER
    COUNTER += 1
    deque_like = deque([1, 2, 3])
    try:
        raise ValueError("x")
    except ValueError as problem:
        message = str(problem)
    if (walrus_value := len(message)) > 0:
        pass
    return COUNTER, list(deque_like), walrus_value, f"{message!r:>6} {'quoted'} {{braces}}"

def with_match(command):
    match command:
        case [first_word, *rest_words]:
            result_value = (first_word, rest_words)
        case {"k": mapped, **others}:
            result_value = (mapped, others)
        case _:
            result_value = None
    return result_value

class Holder:
    """Class docstring."""
    attribute = 1
    def method(self, number):
        """Only a docstring in the end."""

    def other(self, number):
        local_copy = number + self.attribute
        class Inside:
            attribute = local_copy
        return Inside.attribute, 1 .real, 2 if local_copy else 3
'''


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or ([] if isinstance(node, ast.Module) else [ast.Pass()])
    return tree


def _renaming(a: ast.AST, b: ast.AST) -> dict[str, str]:
    """The renaming of ``Name`` ids that makes the two trees equal (AssertionError if none does)."""
    names: dict[str, str] = {}

    def same(x, y) -> None:
        assert type(x) is type(y), (x, y)
        if isinstance(x, ast.AST):
            for fname in x._fields:
                if isinstance(x, ast.Name) and fname == "id":
                    assert names.setdefault(x.id, y.id) == y.id, f"{x.id} renamed two ways"
                else:
                    same(getattr(x, fname), getattr(y, fname))
        elif isinstance(x, list):
            assert len(x) == len(y)
            for p, q in zip(x, y):
                same(p, q)
        else:
            assert x == y or (x != x and y != y), (x, y)

    same(a, b)
    assert len(set(names.values())) == len(names), "two names renamed to one"
    return names


def _outside_functions(tree: ast.AST) -> set[str]:
    """Every name a module or class body uses or defines (function bodies not entered)."""
    names: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name):
            names.add(node.id)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return names


def _minify_checks(source: str, rng: random.Random) -> str:
    mini = minify_python(source, rng)
    assert mini is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a SyntaxWarning (1if ...)
        compile(mini, "<minified>", "exec")
    # the same tree as the source without its docstrings, up to a consistent renaming of names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = _without_docstrings(ast.parse(source))
    renamed = {k: v for k, v in _renaming(original, ast.parse(mini)).items() if k != v}
    assert not renamed.keys() & (_outside_functions(original) | set(dir(builtins)))
    assert all(len(new) < len(old) for old, new in renamed.items())
    # no comments, no blank lines, one space of indentation per level
    tokens = list(tokenize.generate_tokens(io.StringIO(mini).readline))
    assert not [t for t in tokens if t.type == tokenize.COMMENT]
    assert all(line.strip() for line in mini.splitlines())
    depth = 0
    for t in tokens:
        if t.type == tokenize.INDENT:
            depth += 1
            assert t.string == " " * depth
        elif t.type == tokenize.DEDENT:
            depth -= 1
    return mini


def test_minified_code_means_what_the_source_meant() -> None:
    mini = _minify_checks(TRICKY, random.Random(1))
    assert "docstring" not in mini and "comment" not in mini and len(mini) < len(TRICKY) / 1.5
    for name in ("squares", "accumulated", "message", "result_value", "local_copy"):  # locals: shortened
        assert not re.search(rf"\b{name}\b", mini), name
    for name in ("COUNTER", "outer", "values", "scale", "problem", "first_word", "mapped", "attribute", "deque",
                 "total"):  # (total is nonlocal in a nested function)
        assert re.search(rf"\b{name}\b", mini), name  # globals, parameters, captures, attributes: kept
    results = []
    for code in (TRICKY, mini):
        ns: dict = {}
        exec(compile(code, "<x>", "exec"), ns)
        results.append((ns["outer"]([1, 2, 3]), ns["uses_global"](), ns["uses_global"](),
                        ns["with_match"](["go", "north", "fast"]), ns["with_match"]({"k": 1, "z": 2}),
                        ns["with_match"](5), ns["Holder"]().other(4), ns["Holder"]().method(1)))
    assert results[0] == results[1]


def test_minified_stdlib_files_compile_and_match() -> None:
    rng = random.Random(5)
    files = sorted(STDLIB.glob("*.py"))
    for path in rng.sample(files, 12):
        source = path.read_text(errors="replace")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compile(source, str(path), "exec")
        except SyntaxError:
            assert minify_python(source) is None
            continue
        _minify_checks(source, rng)
    assert minify_python("def broken(:\n    pass\n") is None


def test_table_documents_have_their_declared_columns() -> None:
    rng = random.Random(11)
    for _ in range(40):
        size = rng.randint(200, 20000)
        text, columns = table_document(random.Random(rng.random()), size)
        assert len(text) <= size or text.count("\n") == 2
        lines = text.splitlines()
        assert 3 <= len(columns) <= 9 and lines[0].split(",") == [name for name, _ in columns]
        assert len(lines) >= 2
        seen: dict[str, set] = {name: set() for name, _ in columns}
        for row in lines[1:]:
            cells = row.split(",")
            assert len(cells) == len(columns)
            for (name, kind), cell in zip(columns, cells):
                seen[name].add(cell)
                if kind == "int":
                    int(cell)
                    assert re.fullmatch(r"-?\d+", cell)
                elif kind == "float":
                    assert re.fullmatch(r"-?\d+\.\d+", cell)
                elif kind == "word":
                    assert re.fullmatch(r"[a-z]{3,10}", cell)
                elif kind == "date":
                    datetime.date.fromisoformat(cell)
                else:
                    assert kind == "category" and re.fullmatch(r"[a-z]{3,10}", cell)
        for name, kind in columns:
            if kind == "category":
                assert len(seen[name]) <= 6


BOILERPLATE_LINE = re.compile("|".join([
    r"# .*",  # a header comment
    r"#",
    r"",
    r"class [A-Z][A-Za-z]*Stub:",
    r"    def [a-z]+\(self, \*args, \*\*kwargs\):",
    r'        raise NotImplementedError\("[A-Z][A-Za-z]*\.[a-z]+"\)',
    r'[a-z]+ = _stub\("[a-z]+(\.[a-z]+)+"\)',
]))


def test_boilerplate_documents_are_repeated_templates() -> None:
    rng = random.Random(12)
    for _ in range(30):
        size = rng.randint(600, 30000)
        text = boilerplate_document(random.Random(rng.random()), size)
        assert len(text) <= size
        assert text.startswith("# ") and all(BOILERPLATE_LINE.fullmatch(line) for line in text.splitlines())
        if len(text) > 4000:
            assert len(zlib.compress(text.encode(), 9)) < 0.25 * len(text)  # repeats: it compresses well


def test_random_documents_are_random_bytes() -> None:
    rng = random.Random(13)
    kinds = set()
    for _ in range(20):
        size = rng.randint(600, 30000)
        text = random_document(random.Random(rng.random()), size)
        assert len(text) <= size
        lines = text.splitlines()
        if all(len(line) == 64 and re.fullmatch(r"[0-9a-f]+", line) for line in lines):
            raw, kinds = b"".join(bytes.fromhex(line) for line in lines), kinds | {"hex"}
        else:
            assert all(len(line) == 76 for line in lines)
            raw, kinds = b"".join(base64.b64decode(line, validate=True) for line in lines), kinds | {"base64"}
        if len(raw) > 2000:
            assert len(zlib.compress(raw, 9)) > 0.98 * len(raw)  # incompressible
    assert kinds == {"hex", "base64"}


# ----------------------------------------------------------------------------- errors and the CLI


def test_bad_settings_are_refused(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    for kw, msg in [(dict(noise_fraction=1.5), "--noise-fraction must be in"),
                    (dict(noise_fraction=float("nan")), "--noise-fraction must be in"),
                    (dict(duplicate_fraction=-0.1), "--duplicate-fraction must be in"),
                    (dict(noise_fraction=0.6, duplicate_fraction=0.4), "leave no clean train bytes"),
                    (dict(noise_kinds=("table", "noisy")), "'table,noisy' must name some of"),
                    (dict(noise_kinds=()), "must name some of"),
                    (dict(noise_placement="between"), "--noise-placement must be one of files, inside, got 'between'"),
                    (dict(val_fraction=0.5), "--val-fraction must be in"),
                    (dict(seed=-1), "--seed must be >= 0, got -1"),
                    (dict(include="*.nothing"), "no file under"),
                    (dict(val_fraction=0.0001, include="json/*"), "0 val files")]:
        with pytest.raises((ConfigError, DataError), match=re.escape(msg)):
            build_corpus(_spec(source, out, **kw), verbose=False)
        assert not out.exists() and not list(tmp_path.glob(".c.partial*"))
    with pytest.raises(DataError, match="is not a folder"):
        build_corpus(_spec(source / "README.txt", out), verbose=False)
    inside = source / "built"  # the copy would join its own source
    with pytest.raises(DataError, match=re.escape(f"--out {inside} is inside the source {source}")):
        build_corpus(_spec(source, inside), verbose=False)
    assert not inside.exists()


def test_out_outside_check_resolves_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one check behind ``corpus build`` and ``corpus filter``: an --out inside the
    source is refused however it is spelled (relative, through ``..``, through a link);
    a sibling whose name merely starts with the source's is not inside it."""
    from sparsetrain.corpora import check_out_outside

    source = tmp_path / "src"
    (source / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(source)
    monkeypatch.chdir(source / "deep")
    for out in ("new", "../new", str(tmp_path / "link" / "new"), str(source / "deep" / ".." / "x")):
        with pytest.raises(DataError, match=re.escape(f"--out {out} is inside the corpus {source}")):
            check_out_outside(out, source, "corpus")
    for out in (str(tmp_path / "src2"), "../../other", str(tmp_path / "link2")):
        check_out_outside(out, source, "corpus")  # beside it, not inside
    check_out_outside("anything", tmp_path / "missing")  # no source folder: nothing to join
    # inside any built corpus (its manifest marks it), whatever the source
    from sparsetrain.data import MANIFEST_NAME

    built = tmp_path / "built"
    (built / "sub").mkdir(parents=True)
    (built / MANIFEST_NAME).write_text("{}")
    for out in (str(built / "x"), str(built / "sub" / "y")):
        with pytest.raises(DataError, match=re.escape(f"--out {out} is inside the corpus {built.resolve()}")):
            check_out_outside(out, source, "corpus")
    check_out_outside(str(tmp_path / "built2"), source)  # beside it


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return int(e.code)


def test_corpus_cli(source: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    argv = ["corpus", "build", "--src", str(source), "--include", "*.py", "--exclude", "*/tests/*", "--val-fraction",
            "0.1", "--noise-fraction", "0.25", "--noise-kinds", "boilerplate,random", "--seed", "9", "--out", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"--data {out} --val-fraction 0.1" in said and "noise 25.0% of the train bytes" in said
    assert json.loads((out / MANIFEST_NAME).read_text())["noise_kinds"] == ["boilerplate", "random"]
    before = _tree(out)
    for args, msg in [(argv, "exists and is not an empty folder"),
                      ([*argv[:-1], str(tmp_path / "d"), "--noise-fraction", "2"], "--noise-fraction must be in [0, 1), got 2.0"),
                      ([*argv[:-1], str(tmp_path / "d"), "--noise-kinds", "tables"], "'tables' must name some of"),
                      (["corpus", "build", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")], "nowhere"),
                      (["corpus", "build", "--out", str(tmp_path / "d")], "--src"),
                      (["corpus", "build", "--src", str(source), "--out", str(tmp_path / "d"), "--max-bytes", "x"], "'x'")]:
        assert _exit_code(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and msg in err and "Traceback" not in err, (args, err)
    assert _tree(out) == before and not (tmp_path / "d").exists()


def test_the_loader_reads_clean_val_tokens(corpus_dir: Path, tmp_path: Path) -> None:
    """Through the token cache: the val tokens decode to the clean val files, noise is among the train tokens."""
    import numpy as np

    from sparsetrain.data import load_corpus

    out = tmp_path / "c"
    manifest = build_corpus(CorpusSpec(src=str(corpus_dir), out=str(out), val_fraction=0.1, noise_fraction=0.3,
                                       noise_kinds=("table", "boilerplate", "random"), seed=1), verbose=False)
    corpus = load_corpus(str(out), 320, 0.1, tmp_path / "cache", verbose=False)
    tok = corpus.tokenizer

    def documents(tokens: np.ndarray) -> list[str]:
        cuts = np.flatnonzero(tokens == tok.eot_id)
        return [tok.decode(tokens[a + 1:b].tolist()) for a, b in zip(cuts, [*cuts[1:], len(tokens)])]

    clean = {p.relative_to(corpus_dir).as_posix(): p.read_text() for p in corpus_dir.rglob("*.py")}
    assert documents(np.asarray(corpus.val)) == [clean[r] for r in sorted(clean) if is_val_file(r, 0.1)]
    train_docs = documents(np.asarray(corpus.train))
    generated = sorted(manifest["generated"])
    assert len(train_docs) == sum(not is_val_file(r, 0.1) for r in clean) + len(generated)
    assert (out / generated[0]).read_text() in train_docs


def test_disjoint_from_shares_no_file_and_caps_what_remains(source: Path, tmp_path: Path) -> None:
    """A reference set from the same source as a domain: no file in common, and the cap
    fills from the files the domain did not take (compared with an independent listing)."""
    domain = tmp_path / "domain"
    build_corpus(_spec(source, domain, max_bytes=400_000, noise_fraction=0.2), verbose=False)
    domain_clean = {r for r in _tree(domain) if not _is_generated(r) and r != MANIFEST_NAME}
    everything = _source_selection(source)
    assert domain_clean and domain_clean < set(everything)
    ref = tmp_path / "ref"
    manifest = build_corpus(_spec(source, ref, max_bytes=300_000, disjoint_from=str(domain)), verbose=False)
    ref_clean = {r for r in _tree(ref) if r != MANIFEST_NAME}
    assert ref_clean and not ref_clean & domain_clean
    rest = {r: c for r, c in everything.items() if r not in domain_clean}
    assert ref_clean <= set(rest) and sum(len(rest[r]) for r in ref_clean) <= 300_000
    # the cap is filled: any file of the rest that was left out would not have fit
    room = 300_000 - sum(len(rest[r]) for r in ref_clean)
    assert all(len(c) > room for r, c in rest.items() if r not in ref_clean)
    assert manifest["source"]["disjoint_from"]["files_left_out"] == len(domain_clean)
    # without the cap, the reference set is exactly the rest
    full = build_corpus(_spec(source, tmp_path / "full", disjoint_from=str(domain)), verbose=False)
    assert {r for r in _tree(tmp_path / "full") if r != MANIFEST_NAME} == set(rest)
    assert full["source"]["files"] == len(rest)


def test_disjoint_from_needs_a_built_corpus(source: Path, tmp_path: Path, capsys) -> None:
    argv = ["corpus", "build", "--src", str(source), "--out", str(tmp_path / "r"), "--disjoint-from", str(source)]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--disjoint-from" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_empty_paths_are_refused_not_read_as_the_current_folder(source: Path, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    """``--src ''`` would copy the folder the command runs in, ``--out ''`` write into it."""
    here = tmp_path / "here"
    shutil.copytree(source, here)  # text files that a build would copy
    monkeypatch.chdir(here)
    before = _tree(here)
    for argv, flag in [(["corpus", "build", "--src", "", "--out", str(tmp_path / "d"), "--val-fraction", "0.1"], "--src"),
                       (["corpus", "build", "--src", str(source), "--out", "", "--val-fraction", "0.1"], "--out")]:
        assert _exit_code(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag} must not be empty" in err[0] and "Traceback" not in err[0], (argv, err)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # an empty folder passes the --out check: nothing may be written into it either
    assert _exit_code(["corpus", "build", "--src", str(source), "--out", "", "--val-fraction", "0.1"]) == 2
    assert "--out must not be empty" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and _tree(here) == before and not list(empty.iterdir())
    for kw, flag in [(dict(src=""), "--src"), (dict(out=""), "--out")]:
        with pytest.raises(ConfigError, match=f"^{flag} must not be empty"):
            build_corpus(CorpusSpec(**{"src": str(source), "out": str(tmp_path / "e"), **kw}), verbose=False)


def test_an_out_without_a_name_of_its_own_is_refused(source: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The build writes beside --out and renames into place: --out . (an empty current folder) cannot be."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for out in (".", "sub/.."):
        assert _exit_code(["corpus", "build", "--src", str(source), "--out", out, "--val-fraction", "0.1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out} names no folder of its own" in err[0], err
    assert not list(empty.iterdir())
