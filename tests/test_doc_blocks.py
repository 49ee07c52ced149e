"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one namespace (a page's examples build on each other), in a temporary working
directory, with one torch thread. A block that needs what CI does not have (a GPU, a downloaded file) must say so in
its own code (e.g. ``if torch.cuda.is_available():``), not be skipped here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(_blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{path.name}, python block {i} failed: {type(e).__name__}: {e}\n{code}") from e


def test_the_block_pattern_finds_blocks():
    assert _blocks(Path(os.devnull)) == []
    text = "x\n```python\nprint(1)\n```\n```bash\nls\n```\n"
    tmp = ROOT / "tests" / "__doc_probe__.md"
    try:
        tmp.write_text(text)
        assert _blocks(tmp) == ["print(1)\n"]
    finally:
        tmp.unlink()
