"""The README and docs/: every relative link and image resolves, the README stays a front door, its test command is
CI's, and no docstring in src/ cites a file the repository does not have.

(Their `python run.py ...` / `python sweep.py ...` lines are composed by tests/test_sweep.py.)"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 20_480

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1", re.S)
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def prose(text: str) -> str:
    """The text with fenced code blocks removed and inline code spans emptied (links there are not links)."""
    return INLINE_CODE.sub("``", FENCE.sub("", text))


def links(doc: Path) -> list[str]:
    text = prose(doc.read_text())
    return [*MD_LINK.findall(text), *HTML_LINK.findall(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (code spans, links, emphasis as their text), lower case,
    punctuation other than hyphens and underscores dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """Every heading's anchor in `doc`, a repeated one numbered -1, -2... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", doc.read_text())):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_documents_are_there():
    names = {p.name for p in DOCUMENTS}
    assert "README.md" in names and len(DOCUMENTS) > 1, names


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(doc):
    broken = []
    for target in links(doc):
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if path.startswith("/"):
            broken.append(f"{target}: absolute (links are relative)")
        elif not file.exists():
            broken.append(f"{target}: no file {file}")
        elif not file.resolve().is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_links_are_found():
    """The link check reads markdown links, images and HTML ones, and not what sits in code."""
    readme = links(REPO / "README.md")
    assert "docs/figures/table_reward_accuracy.png" in readme and "docs/results.md" in readme
    text = 'a [x](one.md#two "t") and ![i](<fig.png>), `[no](code.md)`, <img src="h.png">\n```\n[no](block.md)\n```\n'
    assert MD_LINK.findall(prose(text)) + HTML_LINK.findall(prose(text)) == ["one.md#two", "fig.png", "h.png"]


def test_slugs_are_githubs():
    assert slug("Against TRL (`python bench/vs_trl.py`)") == "against-trl-python-benchvs_trlpy"
    assert slug("Multi-teacher GRPO-KD (J', J'', J''')") == "multi-teacher-grpo-kd-j-j-j"
    assert slug("Weights & Biases") == "weights--biases"
    assert slug("Tuned defaults (`python sweep.py sweep=tune`, validation split)") == "tuned-defaults-python-sweeppy-sweeptune-validation-split"


def test_the_readme_is_a_front_door():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (at most {README_MAX_BYTES})"


def test_the_readme_test_command_is_the_one_ci_runs():
    """The README's quick-start test command is .ci/run's, up to pip's and pytest's -q (CI keeps its log short)."""

    def words(line: str) -> list[str]:
        return [w for w in shlex.split(line, comments=True) if w != "-q"]

    readme = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("pip install") and "pytest" in line]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("pip install") and "pytest" in line]
    assert len(readme) == 1 and len(ci) == 1, (readme, ci)
    assert words(readme[0]) == words(ci[0])


def test_the_readme_suite_time_is_the_makefiles():
    minutes = re.search(r"about (\d+) minutes", (REPO / "Makefile").read_text()).group(1)
    assert f"takes about {minutes} minutes" in (REPO / "README.md").read_text()


# --- docstrings that cite files -------------------------------------------------------------------------------------

# A docstring cites a file when it names a document (`*.md`) or a repository path (`conf/...`, `src/...`,
# `grpokd/...`, `tests/...`, `bench/...`, `docs/...`). Names the code itself reads or writes (`table.md` of a sweep,
# `results.json`) are files of a run, not citations.
CITED = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w.-]*[\w-]\.md|(?:conf|src|grpokd|tests|bench|docs)/[\w./-]*\w\.\w+)\b")


def docstrings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            out.append((node.body[0].lineno, doc))
    return out


def string_constants(path: Path) -> set[str]:
    """Every string literal of the module that is not a docstring."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in [tree, *ast.walk(tree)] if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


def cited_files_missing() -> list[str]:
    sources = sorted(p for p in (REPO / "src").rglob("*.py") if ".egg-info" not in str(p))
    written = set().union(*(string_constants(p) for p in sources))  # names the code reads or writes
    missing = []
    for path in sources:
        for line, doc in docstrings(path):
            for name in CITED.findall(doc):
                bases = (REPO, REPO / "src", REPO / "src" / "grpokd", path.parent)
                if any((base / name).exists() for base in bases):
                    continue
                if any(s == name or s.endswith("/" + name) for s in written):
                    continue
                missing.append(f"{path.relative_to(REPO)}:{line}: cites {name}")
    return missing


def test_citation_finder():
    assert CITED.findall("see DESIGN.md section 2, conf/model/smollm2.yaml and `grpokd/models/convert.py`.") == [
        "DESIGN.md", "conf/model/smollm2.yaml", "grpokd/models/convert.py"]
    assert CITED.findall("writes results.json and predictions.jsonl; docs/results.md") == ["docs/results.md"]


def test_no_docstring_cites_a_file_the_repository_lacks():
    missing = cited_files_missing()
    assert not missing, "\n".join(missing)
