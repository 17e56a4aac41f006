"""Every ``docs/<page>.md#<anchor>`` the repository cites, and every in-page ``(#anchor)`` link of a docs page,
leads to a heading that exists (anchors as GitHub renders them), so a renamed heading cannot strand its citations."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")
IN_PAGE_LINK = re.compile(r"\]\(#([\w-]+)\)")
SCANNED_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".xml", ".cfg", ".toml", ".sh", ".txt"}
SKIPPED_DIRS = {".git", ".venv", "build", "install", "log", "__pycache__", "results"}


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    """Anchors of a page's headings (outside code blocks); duplicates get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"#{1,6} (.+)", line)
        if in_code or m is None:
            continue
        base = github_anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def scanned_files() -> list[Path]:
    return [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in SCANNED_SUFFIXES
            and not SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts)]


def test_github_anchor_rule() -> None:
    assert github_anchor("Single-step forward") == "single-step-forward"
    assert github_anchor("x0") == "x0"
    assert github_anchor("Virtual KITTI 2") == "virtual-kitti-2"
    assert github_anchor("The `foo_bar` option (new)") == "the-foo_bar-option-new"


def test_every_cited_docs_anchor_exists() -> None:
    missing = []
    cited = 0
    for path in scanned_files():
        for page, anchor in CITATION.findall(path.read_text(errors="replace")):
            cited += 1
            target = ROOT / "docs" / page
            if not target.is_file() or anchor not in anchors_of(target):
                missing.append(f"{path.relative_to(ROOT)}: docs/{page}#{anchor}")
    assert cited > 0, "no docs/*.md#anchor citation found: the scan is broken"
    assert not missing, "citations of headings that do not exist:\n" + "\n".join(missing)


def test_in_page_links_of_docs_exist() -> None:
    missing = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        anchors = anchors_of(page)
        missing += [f"{page.name}: #{a}" for a in IN_PAGE_LINK.findall(page.read_text()) if a not in anchors]
    assert not missing, "in-page links to headings that do not exist:\n" + "\n".join(missing)


RELATIVE_LINK = re.compile(r"\]\(([\w./-]+\.md)(?:#([\w-]+))?\)")


def test_relative_links_of_the_readme_and_docs_lead_somewhere() -> None:
    """README.md and docs/*.md link each other by relative paths (``[x](docs/node.md#topics)``, ``[x](node.md)``):
    the file and, where given, the heading must exist, so nothing moved out of the README is stranded."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing, linked = [], 0
    for page in pages:
        for target, anchor in RELATIVE_LINK.findall(page.read_text()):
            linked += 1
            path = (page.parent / target).resolve()
            if not path.is_file():
                missing.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in anchors_of(path):
                missing.append(f"{page.relative_to(ROOT)}: {target}#{anchor} (no such heading)")
    assert linked > 10, "few relative links found: the scan is broken"
    assert not missing, "links that lead nowhere:\n" + "\n".join(missing)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
