"""docs/interop.md: every ```python block runs as it stands (each in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_page_has_recipes():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_interop_doc_block_runs(index, capsys):
    pytest.importorskip("diffusers")
    code = BLOCKS[index]
    exec(compile(code, f"{DOC.name}[block {index}]", "exec"), {"__name__": f"interop_doc_{index}"})
