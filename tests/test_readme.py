"""Every fenced python block of the README runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run():
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no python block"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)


def test_optimizers_page_python_blocks_run():
    page = README.parent / "docs" / "optimizers.md"
    namespace: dict = {}
    for i, block in enumerate(python_blocks(page.read_text())):
        exec(compile(block, f"docs/optimizers.md python block {i}", "exec"), namespace)


def test_every_markdown_file_the_code_and_docs_name_is_in_the_repo():
    # docs and docstrings stand alone: a cited markdown file resolves from the repo root, the citing file's folder
    # or docs/; nothing points to notes that live outside the repository
    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("*.md"), *root.glob("docs/*.md")]
    for folder in ("nestlearn", "tests", "experiments", "benchmarks"):
        files += root.glob(f"{folder}/**/*.py")
    missing = set()
    for f in files:
        for ref in re.findall(r"(?<![\w/.-])((?:[\w-]+/)*[\w.-]+\.md)\b", f.read_text(encoding="utf-8")):
            if not any((base / ref).exists() for base in (root, f.parent, root / "docs")):
                missing.add(f"{f.relative_to(root)}: {ref}")
    assert not missing, sorted(missing)
