"""The Annotate editor's browser script is three files (static/annotate.js, annotate_input.js, annotate_unsaved.js)
that annotate_tab.py joins into one gr.HTML js_on_load script: they share its function scope, so one file's
top-level names are the others' too. These tests keep that sharing explicit: the tab ships the parts in their
order, and each part's header lists exactly the names it takes from the other parts. (What the editor does is
tested in the browser: tests/annotate_browser, tests/test_touch_browser.py.)"""

from __future__ import annotations

import re

from pixelllm.ui import annotate as an
from pixelllm.ui.annotate_tab import _assets

PARTS = ("annotate.js", "annotate_input.js", "annotate_unsaved.js")  # in their load order


def _text(name: str) -> str:
    return (an.static_dir() / name).read_text()


def _code(text: str) -> str:
    """The text without comments and string contents (names in them are not uses)."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', text)
    return re.sub(r"'(?:[^'\\\n]|\\.)*'", "''", text)


def _top_level(text: str) -> set[str]:
    return set(re.findall(r"^(?:const|let|function)\s+([A-Za-z_$][\w$]*)", text, re.M))


def _listed(text: str) -> dict[str, set[str]]:
    """The header's `// Uses from <part>: a, b,` lines (continued on `//   ` lines) as {part: names}."""
    listed: dict[str, set[str]] = {}
    part = None
    for line in text.splitlines():
        if not line.startswith("//"):
            break
        start = re.match(r"// Uses from (\S+): ?(.*)", line)
        if start:
            part, rest = start.groups()
        elif part and line.startswith("//   "):
            rest = line[2:]
        else:
            part = None
            continue
        listed.setdefault(part, set()).update(n for n in re.split(r"[,\s]+", rest) if n)
    return listed


def test_the_tab_ships_the_parts_as_one_script_in_their_order():
    editor_js = _assets()[1]
    at = [editor_js.find(_text(name)) for name in PARTS]
    assert -1 not in at and at == sorted(at)
    # the last part starts the editor, once every part is defined
    assert editor_js.rstrip().endswith("render();")


def test_each_part_lists_the_names_it_uses_from_the_others():
    texts = {name: _text(name) for name in PARTS}
    declared = {name: _top_level(text) for name, text in texts.items()}
    for name, text in texts.items():
        code = _code(text)
        local = set(re.findall(r"\b(?:const|let|var)\s+([A-Za-z_$][\w$]*)", code))  # shadowing, e.g. `now`
        used = set(re.findall(r"(?<![\w$.])[A-Za-z_$][\w$]*", code)) - local
        uses = {other: used & declared[other] for other in PARTS if other != name and used & declared[other]}
        assert _listed(text) == uses, name
    names = [n for text in texts.values() for n in _top_level(text)]
    assert len(names) == len(set(names))  # one scope: a name declared in two parts would not load at all
