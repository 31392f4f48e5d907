"""The documentation points at things that exist, and the README keeps its shape.

Checked in README.md and every docs/*.md:

* every relative Markdown link ``[text](path)`` and image ``![alt](path)`` resolves, relative to
  the Markdown file, to an existing file or folder (web and mail links are skipped, a
  ``#fragment`` is stripped); a ``#fragment`` into a Markdown file, or a pure ``#anchor``,
  must name one of its headings;
* every repository path written in inline code (for example ``ckpt/demo_pretrained.pth`` or
  ``docs/cli.md`` between single backticks) exists, relative to the repository root. Only tokens that clearly are
  paths of this repository are checked: a path whose first part is one of the repository's
  top-level folders, or a bare top-level file name ending in .py/.md/.sh (and, when the code
  span is nothing but that name, .csv/.json/.png). Placeholders (``<dir>``, ``*``, ``OUT``,
  ``DIR``, ``PATH``), absolute paths and outputs that commands create (paths the repository's
  .gitignore ignores, such as ``runs/`` or ``Figs/transferability.png``) are skipped.

Fenced and indented code blocks hold commands and printouts, not references, and are skipped.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# Top-level folders of the repository. Fixed on purpose: a folder the docs name but that does
# not exist (yet) must fail, not be silently skipped.
TOP_LEVEL_FOLDERS = {"bench", "ckpt", "data", "docs", "engine", "Figs", "metrics", "models", "results", "study", "tests"}
BARE_ALWAYS = (".py", ".md", ".sh")           # a bare name with these endings is a top-level file
BARE_ALONE = (".csv", ".json", ".png")        # only when the code span is just that name
PLACEHOLDER_CHARS = set("<>*{}[]$~|=,;:()'\"")
PLACEHOLDER_HEADS = ("OUT", "DIR", "PATH")    # OUT.pth, OUT/report.md, DIR/...
OUTPUT_FOLDERS = {"runs", "out", "tmp"}

QUICK_START = (
    "    pip install -r requirements.txt\n"
    "    python cal_transferability.py      # main job, on the demo checkpoints shipped in ckpt/\n"
    "    python -m pytest -q                # the test suite\n"
)


# --------------------------------------------------------------------------- parsing


def _gitignore_rules() -> list[tuple[bool, str]]:
    """(negated, pattern) for each rule of the repository's .gitignore, in order."""
    path = ROOT / ".gitignore"
    rules = []
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!")))
    return rules


def _rule_matches(pattern: str, path: str, is_dir: bool) -> bool:
    """Whether one gitignore pattern matches ``path`` (relative, '/'-separated) itself."""
    if pattern.endswith("/"):
        if not is_dir:
            return False  # a folder-only rule
        pattern = pattern.rstrip("/")
    if "/" in pattern:  # anchored at the repository root
        return fnmatch.fnmatchcase(path, pattern.lstrip("/"))
    return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)


def is_ignored(path: str) -> bool:
    """Whether .gitignore ignores ``path`` or a folder above it: the last matching rule wins,
    and a file in an ignored folder stays ignored, as in git."""
    parts = path.rstrip("/").split("/")
    rules = _gitignore_rules()
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        is_dir = depth < len(parts) or path.endswith("/") or (ROOT / prefix).is_dir()
        ignored = False
        for negated, pattern in rules:
            if _rule_matches(pattern, prefix, is_dir):
                ignored = not negated
        if ignored:
            return True
    return False


def _prose(text: str) -> str:
    """``text`` with fenced and indented code blocks blanked (line numbers kept)."""
    lines = text.split("\n")
    out = []
    fence = None
    previous_blank_or_code = True
    for line in lines:
        stripped = line.lstrip()
        if fence is not None:
            out.append("")
            if stripped.startswith(fence):
                fence = None
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            out.append("")
            continue
        # An indented code block cannot interrupt a paragraph: it starts after a blank line.
        is_code = line.startswith(("    ", "\t")) and line.strip() and previous_blank_or_code
        if is_code:
            out.append("")
            previous_blank_or_code = True
            continue
        out.append(line)
        previous_blank_or_code = not line.strip()
    return "\n".join(out)


@dataclass(frozen=True)
class Ref:
    doc: Path
    line: int
    kind: str      # "link" or "code"
    target: str    # as written
    path: Path     # what must exist

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}:{self.target}"


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _link_refs(doc: Path, prose: str) -> list[Ref]:
    refs = []
    for match in LINK.finditer(prose):
        target = match.group(1)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # http(s):, mailto:, ...
        path = target.split("#", 1)[0].split("?", 1)[0]
        # A pure #anchor points into the page itself (which exists); its heading is checked below.
        refs.append(Ref(doc, _line_of(prose, match.start()), "link", target, doc.parent / path if path else doc))
    return refs


def repository_path(token: str, alone: bool) -> str | None:
    """The repository path ``token`` names, or None when it is not clearly one."""
    token = token.strip(".,;:()")
    if not token or token.startswith(("/", "-", ".", "http")) or "..." in token or ".." in token.split("/"):
        return None
    if PLACEHOLDER_CHARS & set(token) or token.startswith(PLACEHOLDER_HEADS):
        return None
    if "/" in token:
        head = token.split("/", 1)[0]
        if head in OUTPUT_FOLDERS or head not in TOP_LEVEL_FOLDERS:
            return None
        return None if is_ignored(token) else token
    if token.endswith(BARE_ALWAYS) or (alone and token.endswith(BARE_ALONE)):
        return None if is_ignored(token) else token
    return None


def _code_refs(doc: Path, prose: str) -> list[Ref]:
    refs = []
    # Table cells escape '|' as '\|' inside code; it is never part of a path.
    for match in CODE.finditer(prose):
        span = match.group(1).replace("\\|", " ")
        tokens = span.split()
        for token in tokens:
            path = repository_path(token, alone=len(tokens) == 1)
            if path is not None:
                refs.append(Ref(doc, _line_of(prose, match.start()), "code", token, ROOT / path))
    return refs


def references() -> list[Ref]:
    refs = []
    for doc in DOCS:
        prose = _prose(doc.read_text(encoding="utf-8"))
        refs += _link_refs(doc, prose) + _code_refs(doc, prose)
    return refs


REFS = references()


# --------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("ref", [r for r in REFS if r.kind == "link"], ids=lambda r: r.id)
def test_relative_link_points_at_an_existing_file_or_folder(ref: Ref):
    assert ref.path.exists(), f"{ref.id}: link target {ref.path} does not exist"


@pytest.mark.parametrize("ref", [r for r in REFS if r.kind == "code"], ids=lambda r: r.id)
def test_repository_path_in_inline_code_exists(ref: Ref):
    assert ref.path.exists(), f"{ref.id}: {ref.path.relative_to(ROOT)} does not exist in the repository"


def heading_anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``doc``: lower case, punctuation other than
    '-' and '_' dropped, spaces made '-'."""
    anchors = set()
    for line in _prose(doc.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("ref", [r for r in REFS if r.kind == "link" and "#" in r.target and r.path.suffix == ".md"],
                         ids=lambda r: r.id)
def test_link_to_a_heading_finds_it(ref: Ref):
    if not ref.path.exists():
        pytest.skip(f"{ref.path} does not exist (reported by the link test)")
    fragment = ref.target.split("#", 1)[1]
    assert fragment in heading_anchors(ref.path), f"{ref.id}: no heading #{fragment} in {ref.path.relative_to(ROOT)}"


def test_docs_folder_and_references_are_found():
    """The checks above are not vacuous: the docs exist and hold links and code paths."""
    assert len(DOCS) > 1, "docs/*.md missing"
    assert any(r.kind == "link" and r.doc == README for r in REFS)
    assert any(r.kind == "code" and r.target == "ckpt/demo_pretrained.pth" for r in REFS)


def test_readme_is_at_most_220_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_quick_start_commands_verbatim():
    assert QUICK_START in README.read_text(encoding="utf-8")


def test_readme_gives_the_cpu_only_install_before_the_quick_start_commands():
    """A user without a GPU who follows the quick start in order must meet the CPU build first."""
    text = README.read_text(encoding="utf-8")
    quick_start = text.index("## Quick start")
    cpu_line = text.find("--index-url https://download.pytorch.org/whl/cpu", quick_start)
    assert quick_start < cpu_line < text.index(QUICK_START)


def test_readme_defines_t_on_its_first_screen():
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:40])
    assert re.search(r"T_l = D\(theta_r(\[l\])?, theta_FB(\[l\])?\) / D\(theta_A(\[l\])?, theta_FB(\[l\])?\)",
                     first_screen), "the formula of T is not in README.md's first 40 lines"
    for name in ("theta_r", "theta_A", "theta_FB", "mean(|x - y|)", "overall transferability"):
        assert name in first_screen, f"{name!r} is not explained in README.md's first 40 lines"


def test_no_reference_to_a_missing_design_document():
    for doc in DOCS:
        assert "DESIGN.md" not in doc.read_text(encoding="utf-8"), f"{doc.relative_to(ROOT)} names DESIGN.md"


# --------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize("token, alone, expected", [
    ("ckpt/demo_pretrained.pth", True, "ckpt/demo_pretrained.pth"),
    ("docs/cli.md", True, "docs/cli.md"),
    ("bench/bench_training.py", False, "bench/bench_training.py"),
    ("finetune.py", False, "finetune.py"),
    ("results.json", False, None),          # an output named inside a command
    ("study.json", True, "study.json"),      # alone: must then be a top-level file
    ("runs/study/", True, None),
    ("/data/imagenet", True, None),
    ("OUT.pth", True, None),
    ("OUT/report.md", True, None),
    ("train/<wnid>/*.JPEG", True, None),
    ("cifar-10-batches-py/", True, None),
    ("Figs/transferability.png", True, None),   # written by cal_transferability.py, ignored by git
    ("Figs/study_regression.png", True, "Figs/study_regression.png"),
    ("demo_finetuned_*.pth", True, None),
])
def test_repository_path_rule(token, alone, expected):
    assert repository_path(token, alone) == expected


def test_prose_drops_code_blocks_but_keeps_list_continuations():
    text = "para\n\n    python x.py\n    more\n\n* item `a`\n    continued `b/c`\n```\n`d`\n```\n"
    prose = _prose(text)
    assert "python x.py" not in prose and "`d`" not in prose
    assert "continued `b/c`" in prose and prose.count("\n") == text.count("\n")
