"""Every code block in README.md and docs/ is checked, so a renamed flag, subcommand, target or
import fails CI instead of leaving the docs wrong.

- Python blocks run, in order, in one namespace per page (with torch, torchvision and cbam
  imported), in an empty working folder.
- Shell blocks, and the `$ ` lines of text blocks that show a session, are checked command by
  command, without running the work:
  - `cbam ...` lines (also after `torchrun ... -m cbam` or `OMP_NUM_THREADS=1`) are parsed by
    cbam's own argument parser: the subcommand and every flag must exist and take what the
    line gives. Training them would take minutes to hours.
  - `make X` needs the target X in the Makefile.
  - `python -m MODULE` needs the module, importable, with a `main`.
  - `python -c` runs, in an empty folder.
  - Other lines (cp, for/done, pip, shell comments) are listed in SHELL_OTHER and not run.
- A block the test must not run has `<!-- docs-test: skip (REASON) -->` on the line before it
  (a download, a GPU, a file the reader has); `<!-- docs-test: slow -->` runs it only in
  `make test-slow`.

test_counts prints how many blocks each kind has."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cbam.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+)?\s*$")
MARK = re.compile(r"<!--\s*docs-test:\s*(skip|slow)\b\s*(\(.*\))?\s*-->")
SHELL = ("bash", "sh", "shell", "console")
# Shell lines that are not commands of ours: what they are, and why the test leaves them alone.
SHELL_OTHER = {
    "cp": "copies the reader's own output into docs/",
    "for": "a loop around cbam commands (its body's cbam line is parsed)",
    "done": "the loop's end",
    "pip": "installs packages",
    "srun": "SLURM's launcher (the cbam command after it is parsed)",
}


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    mark: str | None  # "skip", "slow" or None
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            match = FENCE.match(lines[i])
            if not match or not match.group(1):
                i += 1
                continue
            start = i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            mark = MARK.search(lines[start - 1]) if start else None
            found.append(Block(page, start + 1, match.group(1), "\n".join(lines[start + 1 : end]),
                               mark.group(1) if mark else None,
                               (mark.group(2) or "").strip("()") if mark else ""))  # fmt: skip
            i = end + 1
    return found


ALL = blocks()
PYTHON = [b for b in ALL if b.language == "python"]
SHELL_BLOCKS = [b for b in ALL if b.language in SHELL]


def commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def check_command(line: str, scratch: Path) -> str:
    """Check one shell command as the module docstring says; returns what was done."""
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return "empty"
    if words[0] in ("torchrun", "srun") and "cbam" in words:
        words = words[words.index("cbam") :]
    words = [w for w in words if w != "..."]  # "..." stands for the rest of a command above
    if words[0] == "cbam":
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as stop:
            raise AssertionError(f"`{line}`: cbam's parser refused it (exit {stop.code})") from None
        return "parsed"
    if words[0] == "make":
        target = words[1]
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"
        return "make target"
    if words[:2] == ["python", "-m"]:
        import importlib

        module = importlib.import_module(words[2])
        assert hasattr(module, "main"), f"{words[2]} has no main()"
        return "module"
    if words[:2] == ["python", "-c"]:
        done = subprocess.run([sys.executable, "-c", words[2]], capture_output=True, text=True,
                              timeout=300, cwd=scratch)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return "ran"
    assert words[0] in SHELL_OTHER, f"`{line}`: not a command this test knows; add it or mark"
    return "other"


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.name for b in SHELL_BLOCKS])
def test_shell_block(block, tmp_path, monkeypatch):
    if block.mark == "skip":
        pytest.skip(block.reason)
    monkeypatch.chdir(ROOT)  # parsed from the checkout, as the docs run them; nothing is written
    for line in commands(block.code):
        check_command(line, tmp_path)


TEXT_BLOCKS = [b for b in ALL if b.language == "text" and "\n$ " in "\n" + b.code]


@pytest.mark.parametrize("block", TEXT_BLOCKS, ids=[b.name for b in TEXT_BLOCKS])
def test_commands_shown_with_their_output(block, tmp_path, monkeypatch):
    """A text block that shows a session (`$ cbam ...` and what it printed): its commands are
    checked as a shell block's are."""
    monkeypatch.chdir(ROOT)
    code = "\n".join(line[2:] for line in re.sub(r"\\\n\s*", " ", block.code).splitlines()
                     if line.startswith("$ "))  # fmt: skip
    for line in commands(code):
        check_command(line, tmp_path)


def _page_params():
    pages = sorted({b.page for b in PYTHON})
    params = []
    for page in pages:
        slow = any(b.mark == "slow" for b in PYTHON if b.page == page)
        params.append(pytest.param(page, id=str(page.relative_to(ROOT)),
                                   marks=[pytest.mark.slow] if slow else []))  # fmt: skip
    return params


@pytest.mark.parametrize("page", _page_params())
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """The page's Python blocks in order, in one namespace, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec("import torch, torchvision, cbam\ntorch.manual_seed(0)", namespace)
    for block in (b for b in PYTHON if b.page == page):
        if block.mark == "skip":
            continue
        try:
            exec(compile(block.code, block.name, "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{block.name}: {type(error).__name__}: {error}") from error


def test_every_block_is_run_checked_or_marked():
    languages = {"python", *SHELL, "text", "bibtex", "yaml", "json", "csv"}
    unknown = [b.name for b in ALL if b.language not in languages]
    assert not unknown, f"blocks in a language this test does not handle: {unknown}"
    reasons = [b.name for b in ALL if b.mark == "skip" and not b.reason]
    assert not reasons, f"skipped blocks must say why: {reasons}"


def test_counts(capsys):
    python_run = sum(1 for b in PYTHON if b.mark is None)
    shell_checked = sum(1 for b in SHELL_BLOCKS if b.mark is None) + len(TEXT_BLOCKS)
    marked = sum(1 for b in PYTHON + SHELL_BLOCKS if b.mark is not None)
    with capsys.disabled():
        others = len(ALL) - len(PYTHON) - len(SHELL_BLOCKS) - len(TEXT_BLOCKS)
        print(f"\ndocs code blocks: {python_run} Python run, {shell_checked} shell checked "
              f"(with {len(TEXT_BLOCKS)} sessions in text blocks), {marked} marked (skip or "
              f"slow), {others} other text (output, tables, citations)")  # fmt: skip
    assert python_run + shell_checked > 20


def test_readme_is_an_entry_whose_links_resolve():
    """README: at most ~150 lines, the two set-up commands in its first 30, and every relative
    link (docs pages, the figure) pointing at a file in the checkout. docs/ links are checked
    by `make docs` (strict)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    head = "\n".join(lines[:30])
    assert "make main" in head and "make test" in head
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", "\n".join(lines))
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "no links found: the pattern is wrong"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
