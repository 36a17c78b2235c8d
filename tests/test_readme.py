"""The README's library snippet runs as written (against the embedded checkpoint, or a small one when the
embedded checkpoint is absent) and prints what it says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = "assets/checkpoints/shapes-tiny"


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- snippet:library -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its library snippet"
    return match.group(1)


def test_readme_library_snippet_runs(monkeypatch, small_checkpoint):
    code = _snippet()
    assert EMBEDDED in code
    if not (ROOT / EMBEDDED / "model.safetensors").is_file():
        code = code.replace(EMBEDDED, str(small_checkpoint))
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    lines = out.getvalue().splitlines()
    # one line per streamed word with its pixel box, then the conditioned caption, referral and regions
    word_lines = [ln for ln in lines if re.match(r"^\S+ \[[-\d.]+, [-\d.]+, [-\d.]+, [-\d.]+\]$", ln)]
    assert word_lines, lines[:10]
    for ln in word_lines:
        x0, y0, x1, y1 = map(float, re.findall(r"[-\d.]+", ln.split(" ", 1)[1]))
        assert 0 <= x0 <= x1 <= 256 and 0 <= y0 <= y1 <= 256
