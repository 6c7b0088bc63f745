"""The README's Python examples run as written (from the root of a clone), and
what it says a run directory is called and holds is what a run writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparsetrain.config import list_presets

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.fixture
def clone_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory laid out like the clone's root (its src/ linked), with a
    private token cache, so the examples run as written and leave nothing behind."""
    (tmp_path / "src").symlink_to(REPO / "src")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_readme_has_python_examples() -> None:
    assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_example_runs_as_written(index: int, clone_root: Path) -> None:
    code = python_blocks()[index]
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if "train(" in code:  # the example's run folder is named and filled as the README says
        check_run_folder(clone_root, namespace["result"].out_dir)


def check_run_folder(root: Path, out_dir: Path) -> None:
    claim = re.search(r"Each run directory \(`runs/<preset>-<timestamp>/`", README)
    assert claim, "the README no longer says how run folders are named"
    assert re.fullmatch(r"runs/tiny-\d{8}-\d{6}", str(out_dir)), out_dir
    table = README[claim.end():].split("\n\n", 2)[1]
    listed = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))
    written = {p.name for p in (root / out_dir).iterdir()}
    assert listed == written, (listed, written)


def test_example_run_paths_follow_the_cli_naming() -> None:
    """Every timestamped run path in the README's examples is what the CLI would name it."""
    paths = re.findall(r"runs/([\w.-]*\d{8}-\d{6})", README)
    assert paths
    for name in paths:
        m = re.fullmatch(r"(.+)-\d{8}-\d{6}", name)
        assert m and m.group(1) in list_presets(), name
