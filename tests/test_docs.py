"""Every Python block in docs/ and the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]


def blocks(page: Path) -> str:
    """The page's python blocks, joined: later blocks may use earlier names."""
    return "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_doc_examples_run(page, capsys):
    exec(compile(blocks(page), str(page), "exec"), {"__name__": f"doc_{page.stem}"})
