"""End-to-end with fingers: the Caption viewer on an emulated Pixel 5 (393 px wide) and the Annotate editor on an
emulated iPad (gen 7), in headless Chromium, touches driven through Chrome's own touch pipeline (CDP
`Input.dispatchTouchEvent`).

A finger is not a mouse: a tap moves it a few pixels, and two fingers are a pinch. A tap must stay a tap (a point
prompt, a word selected), a pinch must add no prompt, and a one-finger drag must still draw a box.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import BrowserContext, Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.conftest import start_studio, stop_studio

pytestmark = pytest.mark.browser

TIMEOUT = 20_000  # ms
VIEWER = "#caption-viewer"
EDITOR = "#annotate-editor"
WOBBLE = 8  # CSS px a fingertip drifts during a tap (6 px counted as a drag: a tap drew a tiny box)


@pytest.fixture(scope="module")
def touch_app(app_checkpoint, example_images, tmp_path_factory):
    studio = start_studio(app_checkpoint, example_images, tmp_path_factory.mktemp("touch-store") / "annotations.db")
    yield studio
    stop_studio(studio)


@pytest.fixture
def device(browser, playwright, touch_app):
    """Opens the app in an emulated touch device (a Playwright device name); fails the test on any page or console
    error."""
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def open_on(name: str) -> Page:
        context = browser.new_context(**playwright.devices[name])
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
        page.on("console", lambda msg: errors.append(f"console.error: {msg.text}") if msg.type == "error" else None)
        page.set_default_timeout(TIMEOUT)
        page.goto(touch_app.url)
        return page

    yield open_on
    for context in contexts:
        context.close()
    assert not errors, errors


class Fingers:
    """Touches through CDP: they reach the page as touch pointer events, as on a phone."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.cdp = page.context.new_cdp_session(page)

    def _send(self, kind: str, points: list[tuple[float, float]]) -> None:
        self.cdp.send("Input.dispatchTouchEvent", {
            "type": kind, "touchPoints": [{"x": x, "y": y, "id": i + 1} for i, (x, y) in enumerate(points)]})

    def gesture(self, paths: list[list[tuple[float, float]]], steps: int = 6) -> None:
        """Each finger follows its path (lists of screen points, all of the same length) at once."""
        self._send("touchStart", [path[0] for path in paths])
        for leg in range(1, len(paths[0])):
            for k in range(1, steps + 1):
                t = k / steps
                self._send("touchMove", [(a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)
                                         for a, b in ((path[leg - 1], path[leg]) for path in paths)])
        self._send("touchEnd", [])

    def wobbly_tap(self, x: float, y: float) -> None:
        self.gesture([[(x, y), (x + WOBBLE * 0.6, y + WOBBLE * 0.8), (x + 2, y + 1)]], steps=2)

    def at(self, svg: str, x: float, y: float) -> tuple[float, float]:
        """Where to touch image pixel (x, y) of an SVG (through its own screen transform), the page unzoomed first
        (a pinch, or two taps in a row, zoom it; touch coordinates are then no longer the layout's)."""
        for _ in range(20):  # a reset sent while the browser still animates a pinch does not stick: send it again
            self.cdp.send("Emulation.resetPageScaleFactor")
            try:
                self.page.wait_for_function("visualViewport.scale < 1.01", timeout=1000)
                break
            except PlaywrightTimeoutError:
                # Under load the reset can leave a pinch's zoom in place however often it is sent (seen: 20 resets
                # over 20 s, the scale still 1.62, in 8 runs of 8 at a load of 9 on 2 cores); setting the scale
                # unzooms it (and does not pin it: a later pinch zooms again).
                self.cdp.send("Emulation.setPageScaleFactor", {"pageScaleFactor": 1})
                continue
        else:
            raise AssertionError(f"the page stays zoomed: {self.page.evaluate('visualViewport.scale')}")
        self.page.locator(svg).scroll_into_view_if_needed()
        return self.page.evaluate("""([sel, x, y]) => { const svg = document.querySelector(sel);
            const p = new DOMPoint(x, y).matrixTransform(svg.getScreenCTM()); return [p.x, p.y]; }""", [svg, x, y])


def _smallest_box_at(page: Page, x: float, y: float) -> int:
    """The word the editor selects for a tap at image pixel (x, y): the smallest of the word boxes holding it."""
    boxes = page.locator(f"{EDITOR} rect.pa-box").evaluate_all(
        "els => els.map(e => ['data-i', 'x', 'y', 'width', 'height'].map(k => Number(e.getAttribute(k))))")
    holding = [(w * h, i) for i, bx, by, w, h in boxes if bx <= x <= bx + w and by <= y <= by + h]
    return int(min(holding)[1])


def test_on_a_phone_a_wobbly_tap_is_a_point_a_pinch_adds_nothing_and_a_drag_draws_a_box(device):
    phone = device("Pixel 5")
    phone.locator("#examples button").first.click()
    expect(phone.locator(f"{VIEWER} .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)  # a server answer
    fingers, svg = Fingers(phone), f"{VIEWER} svg.px-svg"
    points = phone.locator(f"{VIEWER} .px-point")
    box = phone.locator(f"{VIEWER} .px-prompt-box")

    fingers.wobbly_tap(*fingers.at(svg, 150, 190))
    expect(points).to_have_count(1)
    expect(box).to_have_count(0)

    a, b = fingers.at(svg, 110, 110), fingers.at(svg, 140, 140)
    fingers.gesture([[a, (a[0] - 40, a[1] - 40)], [b, (b[0] + 40, b[1] + 40)]])  # pinch out over the image
    phone.wait_for_function("visualViewport.scale > 1.05")  # two fingers zoom the page, as on any picture
    fingers.wobbly_tap(*fingers.at(svg, 60, 200))  # a tap after the pinch is one again (and arrives after it)
    expect(points).to_have_count(2)
    expect(box).to_have_count(0)  # the pinch drew no box and added no point

    fingers.gesture([[fingers.at(svg, 40, 40), fingers.at(svg, 120, 100)]])
    expect(box).to_have_count(1)
    assert float(box.get_attribute("x")) == pytest.approx(40, abs=3)
    assert float(box.get_attribute("width")) == pytest.approx(80, abs=4)


def test_on_a_tablet_a_wobbly_tap_in_the_editor_edits_no_box_and_a_drag_does(device):
    tablet = device("iPad (gen 7)")
    tablet.locator("#examples button").first.click()
    expect(tablet.locator(f"{VIEWER} .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)  # a server answer
    tablet.locator("#generate").click()
    expect(tablet.locator(f"{VIEWER} .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    tablet.get_by_role("tab", name="Annotate").click()  # 810 px: the tab bar wraps, every tab stays a tab
    root = tablet.locator(f"{EDITOR} .pa-root")
    # The tab opens the output by itself ("Opened generation"); the button then opens it again, a revision later.
    # Wait for that one: read after the first, the revision went one up under load during the taps below, as if a
    # tap had sent an edit.
    expect(tablet.locator(f"{EDITOR} .pa-status")).to_contain_text("Opened generation", timeout=TIMEOUT)
    opened = int(root.get_attribute("data-rev"))
    tablet.locator("#annotate-open-current").click()
    expect(root).to_have_attribute("data-rev", str(opened + 1), timeout=TIMEOUT)
    fingers, svg = Fingers(tablet), f"{EDITOR} svg.pa-svg"
    first = tablet.locator(f'{EDITOR} rect.pa-box[data-i="0"]')
    before = [float(first.get_attribute(k)) for k in ("x", "y", "width", "height")]
    rev = int(root.get_attribute("data-rev"))

    # In the first word's box: with another word selected a drag there draws that word's box, with the first word
    # selected it moves the first word's box. A tap does neither: it selects the word under it (the smallest box
    # there) and sends no edit.
    tablet.locator(f"{EDITOR} .pa-word").nth(1).click()
    centre = (before[0] + before[2] / 2, before[1] + before[3] / 2)
    fingers.wobbly_tap(*fingers.at(svg, *centre))
    chosen = tablet.locator(f"{EDITOR} .pa-word.pa-sel")
    expect(chosen).to_have_attribute("data-i", str(_smallest_box_at(tablet, *centre)))
    fingers.wobbly_tap(*fingers.at(svg, *centre))  # now inside the selected word's own box
    expect(chosen).to_have_count(1)
    assert int(root.get_attribute("data-rev")) == rev  # no edit was sent
    assert [float(first.get_attribute(k)) for k in ("x", "y", "width", "height")] == before

    fingers.gesture([[fingers.at(svg, 20, 30), fingers.at(svg, 100, 90)]])  # a drag outside it draws its new box
    expect(root).to_have_attribute("data-rev", str(rev + 1), timeout=TIMEOUT)  # the server's answer to the edit
    assert [float(tablet.locator(f"{EDITOR} rect.pa-box.pa-sel").get_attribute(k))
            for k in ("x", "y", "width", "height")] == [pytest.approx(v, abs=3) for v in (20, 30, 80, 60)]

    # "click two corners": a pinch places no corner and edits nothing; two taps set the box
    rev = int(root.get_attribute("data-rev"))
    tablet.locator(f"{EDITOR} select.pa-boxmode").select_option("corners")
    a, b = fingers.at(svg, 100, 100), fingers.at(svg, 150, 150)
    fingers.gesture([[a, (a[0] - 30, a[1] - 30)], [b, (b[0] + 30, b[1] + 30)]])
    fingers.wobbly_tap(*fingers.at(svg, 30, 40))  # after the pinch: the first corner
    expect(tablet.locator(f"{EDITOR} circle.pa-corner")).to_have_count(1)
    assert int(root.get_attribute("data-rev")) == rev  # the pinch sent no box
    fingers.wobbly_tap(*fingers.at(svg, 90, 120))
    expect(root).to_have_attribute("data-rev", str(rev + 1), timeout=TIMEOUT)
    assert [float(tablet.locator(f"{EDITOR} rect.pa-box.pa-sel").get_attribute(k))
            for k in ("x", "y", "width", "height")] == [pytest.approx(v, abs=3) for v in (30, 40, 60, 80)]
