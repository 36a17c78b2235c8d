"""The README's library snippet runs as written (against the embedded checkpoint, or a small one when the
embedded checkpoint is absent) and prints what it says it prints: one line per streamed word with its box, the
location-conditioned caption, one line per referring expression (expression, box, score, mask area) and one line
per dense region (box, score, caption). The expectations come from the snippet itself (its image, expressions and
`max_regions`), not from a recorded run."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = "assets/checkpoints/shapes-tiny"
NUM = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"
BOX = rf"\[({NUM}), ({NUM}), ({NUM}), ({NUM})\]"


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- snippet:library -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its library snippet"
    return match.group(1)


def _call(tree: ast.AST, name: str) -> ast.Call:
    """The snippet's one call of `<something>.<name>(...)`."""
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == name]
    assert len(calls) == 1, f"the snippet should call .{name}() once"
    return calls[0]


def _in_image(box: tuple[str, ...], width: int, height: int) -> bool:
    x0, y0, x1, y1 = map(float, box)
    return 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height


def test_readme_library_snippet_runs(monkeypatch, small_checkpoint):
    code = _snippet()
    assert EMBEDDED in code
    embedded = (ROOT / EMBEDDED / "model.safetensors").is_file()
    if not embedded:
        code = code.replace(EMBEDDED, str(small_checkpoint))
    # What the snippet asks for, read from its own text: the image, the referring expressions, the region cap.
    tree = ast.parse(code)
    image_path = ast.literal_eval(_call(tree, "open").args[0])
    expressions = ast.literal_eval(_call(tree, "refer").args[1])
    max_regions = ast.literal_eval(next(k.value for k in _call(tree, "dense_caption").keywords
                                        if k.arg == "max_regions"))
    assert len(expressions) == 2 and max_regions == 5  # as the README's prose and sample output describe
    with Image.open(ROOT / image_path) as img:
        width, height = img.size
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    lines = out.getvalue().splitlines()

    # 1. one line per streamed word with its pixel box: the leading block of "word [x0, y0, x1, y1]" lines
    n_words = 0
    while n_words < len(lines) and re.fullmatch(rf"\S+ {BOX}", lines[n_words]):
        n_words += 1
    assert n_words >= 1, lines[:10]
    for ln in lines[:n_words]:
        assert _in_image(re.fullmatch(rf"\S+ {BOX}", ln).groups(), width, height), ln

    rest = lines[n_words:]
    # then exactly: the caption, one line per expression, up to max_regions region lines (the embedded model finds
    # the image's three shapes; a random small model's proposals may all fall under the score threshold)
    regions = len(rest) - 1 - len(expressions)
    assert (1 if embedded else 0) <= regions <= max_regions, rest

    # 2. the location-conditioned caption: plain text (no box, no score)
    caption = rest[0]
    assert "[" not in caption, caption
    if embedded:  # a random small model may end its caption at once
        assert caption.strip(), "empty location-conditioned caption"

    # 3. referral lines, in the snippet's order: "<expression> [box] <score rounded to 3> <mask area in pixels>"
    for expression, ln in zip(expressions, rest[1:1 + len(expressions)]):
        assert ln.startswith(expression + " "), (expression, ln)
        match = re.fullmatch(rf"{BOX} ({NUM}) (\d+)", ln[len(expression) + 1:])
        assert match, ln
        assert _in_image(match.groups()[:4], width, height), ln
        score, area = float(match.group(5)), int(match.group(6))
        assert 0 <= score <= 1 and len(match.group(5).split(".")[-1]) <= 3, ln
        assert area <= width * height, ln
        if embedded:
            assert area > 0, f"empty mask: {ln}"

    # 4. dense regions: "[box] <score rounded to 2> <caption>", at most max_regions of them
    for ln in rest[1 + len(expressions):]:
        match = re.fullmatch(rf"{BOX} ({NUM}) (.*)", ln)
        assert match, ln
        assert _in_image(match.groups()[:4], width, height), ln
        assert 0 <= float(match.group(5)) <= 1 and len(match.group(5).split(".")[-1]) <= 2, ln
        if embedded:
            assert match.group(6).strip(), f"region without a caption: {ln}"
