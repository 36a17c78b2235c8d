// PixelLLM annotate editor, part 2 of 3 (the parts and their order: annotate.js): pointer input on the image
// (mouse, touch and pen: select a word, draw or move its box, corners mode, a second finger cancels), recording an
// LN trace, and the keyboard shortcuts.
// Uses from annotate.js: advanceIn, boxModeIn, btn, corner, drag, drawTrace, el, H, kbox, markRecording, paceIn,
//   rec, redrawBoxes, replayTimers, root, say, sel, select, send, svg, view, visible, W, words

// ------------------------------------------------------------------ pointer: boxes
function toImage(evt) {
  const ctm = svg.getScreenCTM();
  if (!ctm || !view.image) return null;
  const p = new DOMPoint(evt.clientX, evt.clientY).matrixTransform(ctm.inverse());
  return [p.x, p.y];
}
const clampX = (x) => Math.min(Math.max(x, 0), W());
const clampY = (y) => Math.min(Math.max(y, 0), H());
function wordAt(p) {
  let best = null;
  words().forEach((wd, i) => {
    const b = wd.box;
    if (p[0] >= b[0] && p[0] <= b[2] && p[1] >= b[1] && p[1] <= b[3]) {
      const area = (b[2] - b[0]) * (b[3] - b[1]);
      if (!best || area < best.area) best = { i: i, area: area };
    }
  });
  return best ? best.i : null;
}
function live() { return svg.querySelector(".pa-live-layer"); }

function dropDrag() { drag = null; const g = live(); if (g) g.replaceChildren(); }
svg.addEventListener("pointerdown", (evt) => {
  // A press on the image takes the keyboard focus into the editor, as a click elsewhere on the page would (the
  // preventDefault below stops the browser doing it). The shortcuts ignore keys while another control of the page
  // has the focus (inScope): after a click on "Open current output", a click on the image and `r` records. The
  // editor's own fields (its text box, selects, slider, checkbox) are left too: a mouse pick in the advance or box
  // mode select keeps the focus there, and the keys with it.
  const focused = document.activeElement;
  if (!(root.contains(focused) && inScope(focused))) root.focus({ preventScroll: true });
  if (drag && evt.pointerId !== drag.id) { dropDrag(); return; }  // a second finger (a pinch): no edit
  if (rec || !view.image || evt.button !== 0) return;
  const p = toImage(evt);
  if (!p) return;
  evt.preventDefault();
  if (boxModeIn.value === "corners" && sel !== null) {
    // the corner is placed when this pointer is lifted: a second finger first (a pinch) places none
    drag = { id: evt.pointerId, start: p, corners: true };
    try { svg.setPointerCapture(evt.pointerId); } catch (e) { /* optional */ }
    return;
  }
  const b = sel !== null ? words()[sel].box : null;
  const inside = b && p[0] >= b[0] && p[0] <= b[2] && p[1] >= b[1] && p[1] <= b[3];
  // a finger moves a few pixels in a tap: touch and pen get a wider slop before a press counts as a drag (with
  // 5 px, tapping another word's box to select it replaced the selected word's box with a tiny one)
  drag = { id: evt.pointerId, start: p, sx: evt.clientX, sy: evt.clientY, moved: false, mode: inside ? "move" : "draw",
           box: b, slop: evt.pointerType === "mouse" ? 5 : 10 };
  try { svg.setPointerCapture(evt.pointerId); } catch (e) { /* optional */ }
});
svg.addEventListener("pointermove", (evt) => {
  if (rec) { capture(evt); return; }
  if (!drag || evt.pointerId !== drag.id || drag.corners) return;
  if (Math.hypot(evt.clientX - drag.sx, evt.clientY - drag.sy) > drag.slop) drag.moved = true;
  if (!drag.moved || sel === null) return;
  const p = toImage(evt);
  if (!p) return;
  drag.box = dragBox(p);
  const g = live();
  g.replaceChildren();
  const b = drag.box;
  el("rect", { class: "pa-rubber", x: b[0], y: b[1], width: b[2] - b[0], height: b[3] - b[1] }, g);
});
function dragBox(p) {
  if (drag.mode === "move") {
    const b = words()[sel].box;
    let dx = p[0] - drag.start[0], dy = p[1] - drag.start[1];
    dx = Math.min(Math.max(dx, -b[0]), W() - b[2]);
    dy = Math.min(Math.max(dy, -b[1]), H() - b[3]);
    return [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy];
  }
  const x0 = clampX(drag.start[0]), y0 = clampY(drag.start[1]), x1 = clampX(p[0]), y1 = clampY(p[1]);
  return [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
}
svg.addEventListener("pointerup", (evt) => {
  if (rec || !drag || evt.pointerId !== drag.id) return;
  const d = drag;
  drag = null;
  const g = live();
  if (g) g.replaceChildren();
  if (d.corners) {
    if (sel === null) return;
    const p = d.start;
    // redrawBoxes, not select(): select() starts a new box and forgets the corner just set
    if (!corner) { corner = [clampX(p[0]), clampY(p[1])]; redrawBoxes(); return; }
    const c = corner;
    corner = null;
    send({ op: "box", i: sel, box: [c[0], c[1], clampX(p[0]), clampY(p[1])] });
    return;
  }
  if (d.moved && sel !== null) {
    const b = d.box.map((v) => Math.round(v * 10) / 10);
    send({ op: "box", i: sel, box: b });
  } else {
    const hit = wordAt(d.start);
    select(hit === null ? null : hit);
  }
});
svg.addEventListener("pointercancel", dropDrag);  // e.g. the browser took a pinch-zoom over

// ------------------------------------------------------------------ recording (LN style)
function now() { return rec ? (performance.now() - rec.t0) / 1000 : 0; }
const r6 = (v) => Math.round(v * 1e6) / 1e6;
const r4 = (v) => Math.round(v * 1e4) / 1e4;
function pace() { return Math.max(0.1, Number(paceIn.value) || 1.5); }

function startRecording() {
  if (rec || !view.recordable || !words().length) return;
  select(null);
  rec = { t0: performance.now(), i: 0, starts: [0], segs: [], cur: null, timer: null };
  root.dataset.recording = "1";
  btn("stop").disabled = false;
  btn("record").disabled = true;
  say("Recording: trace each highlighted word over the image. Space = next word, Esc = cancel.", "warn");
  schedule();
  markRecording();
  live().replaceChildren();
}
function schedule() {
  clearTimeout(rec.timer);
  if (advanceIn.value === "pace") rec.timer = setTimeout(advance, 1000 / pace());
}
function advance() {
  if (!rec) return;
  if (!visible()) { cancelRecording("Recording cancelled: the Annotate tab was left."); return; }
  const t = now();
  if (rec.i >= words().length - 1) { finish(t); return; }
  rec.i += 1;
  rec.starts.push(t);
  schedule();
  markRecording();
}
function capture(evt) {
  const p = toImage(evt);
  if (!p) return;
  if (p[0] < 0 || p[1] < 0 || p[0] > W() || p[1] > H()) { rec.cur = null; return; }  // beside the image: LN ends
  const t = r4(now());
  if (!rec.cur) { rec.cur = []; rec.segs.push(rec.cur); }
  rec.cur.push({ x: r6(p[0] / W()), y: r6(p[1] / H()), t: t });
  const g = live();
  let line = g.querySelector("polyline[data-seg='" + (rec.segs.length - 1) + "']");
  if (!line) line = el("polyline", { class: "pa-live", "data-seg": rec.segs.length - 1, points: "" }, g);
  line.setAttribute("points", rec.cur.map((q) => q.x * W() + "," + q.y * H()).join(" "));
}
svg.addEventListener("pointerleave", () => { if (rec) rec.cur = null; });  // LN: re-entering starts a segment

function cancelRecording(message) {
  if (!rec) return;
  clearTimeout(rec.timer);
  rec = null;
  root.dataset.recording = "0";
  btn("stop").disabled = true;
  btn("record").disabled = false;
  live().replaceChildren();
  markRecording();
  say(message, "warn");
}
function finish(tEnd) {
  if (!rec) return;
  const r = rec;
  clearTimeout(r.timer);
  rec = null;
  root.dataset.recording = "0";
  btn("stop").disabled = true;
  btn("record").disabled = false;
  markRecording();
  const ws = words();
  const timed = ws.map((wd, i) => ({ utterance: wd.text, start_time: r4(r.starts[i] !== undefined ? r.starts[i] : tEnd),
    end_time: r4(i + 1 < r.starts.length ? r.starts[i + 1] : tEnd) }));
  const traces = r.segs.filter((s) => s.length);
  const count = traces.reduce((n, s) => n + s.length, 0);
  if (count < 2) { live().replaceChildren(); say("No trace was captured: move the mouse over the image while the words advance.", "error"); return; }
  say("Recorded " + count + " points; deriving the word boxes…", "info");
  trigger("edit", { op: "trace", traces: traces, timed_caption: timed, rev: view.rev });
}

function replay() {
  replayTimers.forEach(clearTimeout);
  replayTimers = [];
  const traces = view.traces || [];
  const timed = view.timed_caption || [];
  const g = svg.querySelector(".pa-trace-layer");
  if (!g || !traces.length) return;
  const end = traces.reduce((m, s) => Math.max(m, s.length ? s[s.length - 1].t : 0), 0);
  const speed = Math.max(1, end / 6);  // at most ~6 s (real time when shorter)
  root.dataset.replaying = "1";
  const steps = 60;
  for (let k = 0; k <= steps; k++) {
    replayTimers.push(setTimeout(() => {
      drawTrace(g, traces, timed, (end * k) / steps);
      if (k === steps) root.dataset.replaying = "0";
    }, ((end / speed) * 1000 * k) / steps));
  }
}

// ------------------------------------------------------------------ keyboard
// Shift+arrows move the selected word's box, Ctrl+Shift+arrows move its right / bottom edge (a step: 1/64 of the
// image); the new box is drawn as a drag draws it and sent as one edit when Shift is released.
const ARROWS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
function nudge(d, resize) {
  if (!kbox || kbox.i !== sel) kbox = { i: sel, box: words()[sel].box.slice() };
  const s = Math.max(1, Math.round(Math.max(W(), H()) / 64));
  let [x0, y0, x1, y1] = kbox.box;
  if (resize) {
    x1 = Math.min(Math.max(x1 + d[0] * s, x0 + 1), W());
    y1 = Math.min(Math.max(y1 + d[1] * s, y0 + 1), H());
  } else {
    const dx = Math.min(Math.max(d[0] * s, -x0), W() - x1), dy = Math.min(Math.max(d[1] * s, -y0), H() - y1);
    x0 += dx; x1 += dx; y0 += dy; y1 += dy;
  }
  kbox.box = [x0, y0, x1, y1];
  const g = live();
  g.replaceChildren();
  el("rect", { class: "pa-rubber", x: x0, y: y0, width: x1 - x0, height: y1 - y0 }, g);
  say("Box of word " + (sel + 1) + ": " + kbox.box.map((v) => Math.round(v)).join(", ") + " (release Shift to apply)");
}
function commitBox() {
  if (!kbox) return;
  const k = kbox;
  kbox = null;
  if (k.i === sel && view.words) send({ op: "box", i: k.i, box: k.box.map((v) => Math.round(v * 10) / 10) });
  else { const g = live(); if (g) g.replaceChildren(); }
}
// The Shift release that applies a keyboard move may never reach the editor: the window loses the focus (another
// window, a dialog), the page is hidden, another tab of the page is shown. The move is then applied at once, as the
// release would have (undo takes it back); it waited and was applied on some later, unrelated Shift release.
if (window.__pixelllmAnnotateBlur) {
  window.removeEventListener("blur", window.__pixelllmAnnotateBlur);
  document.removeEventListener("visibilitychange", window.__pixelllmAnnotateBlur);
}
window.__pixelllmAnnotateBlur = (evt) => { if (evt.type === "blur" || document.hidden) commitBox(); };
window.addEventListener("blur", window.__pixelllmAnnotateBlur);
document.addEventListener("visibilitychange", window.__pixelllmAnnotateBlur);
if (typeof ResizeObserver === "function") new ResizeObserver(() => { if (kbox && !visible()) commitBox(); }).observe(root);
// Where the shortcuts act (docs/annotate.md): only while the editor is shown (the Annotate tab is selected; a
// hidden tab's editor has no layout box), and only with the focus on nothing (the page body) or inside the editor
// itself, out of its text box, selects, slider and checkbox. Every other control of the page keeps its keys to
// itself: a tab of the tab bar, an example image, the side panel's buttons, fields, radios and dropdowns, a row of
// the browse list, the comparison viewers. (They acted from all of these but text fields, so a letter, an arrow or
// Del on a focused button undid, deleted, moved or saved without the editor being where the user was.) Space and
// Esc while recording are the exception: the recording takes them from anywhere.
function inScope(target) {
  if (!target || target === document.body || target === document.documentElement) return true;
  if (!root.contains(target)) return false;
  return !(target.closest && target.closest("input, textarea, select, [contenteditable]"));
}
function onKey(evt) {
  // a key event without Shift held while a move waits for the release: Shift was released unseen (elsewhere)
  if (kbox && ((evt.type === "keyup" && evt.key === "Shift") || !evt.shiftKey || !visible())) commitBox();
  if (!visible()) return;
  if (rec) {
    if (evt.key === " " || evt.code === "Space") { evt.preventDefault(); evt.stopPropagation(); if (evt.type === "keydown" && !evt.repeat) advance(); return; }
    if (evt.key === "Escape" && evt.type === "keydown") { evt.preventDefault(); cancelRecording("Recording cancelled."); }
    return;
  }
  if (evt.type !== "keydown" || !inScope(evt.target)) return;
  const k = evt.key;
  const ctrl = evt.ctrlKey || evt.metaKey;
  let handled = true;
  if ((k === "z" || k === "Z") && !evt.shiftKey) trigger("history", { op: "undo" });
  else if (k === "y" || k === "Y" || (ctrl && evt.shiftKey && (k === "z" || k === "Z"))) trigger("history", { op: "redo" });
  else if ((k === "s" || k === "S") && !evt.altKey) trigger("save", { status: "draft" });
  else if (evt.shiftKey && !evt.altKey && ARROWS[k] && sel !== null) nudge(ARROWS[k], ctrl);
  else if (ctrl || evt.altKey) handled = false;
  else if (k === "r") startRecording();
  else if (k === "ArrowRight" && words().length) select(sel === null ? 0 : Math.min(sel + 1, words().length - 1));
  else if (k === "ArrowLeft" && words().length) select(sel === null ? words().length - 1 : Math.max(sel - 1, 0));
  else if ((k === "Delete" || k === "Backspace") && sel !== null) send({ op: "delete", i: sel });  // Backspace: a habit
  else if (k === "m" && sel !== null) send({ op: "merge", i: sel });
  else if (k === "n" && sel !== null) send({ op: "non_visual", i: sel, value: !words()[sel].non_visual });
  else if (k === "Escape") { kbox = null; select(null); const g = live(); if (g) g.replaceChildren(); }
  else handled = false;
  if (handled) evt.preventDefault();
}
// One listener per page even if the component is mounted again.
if (window.__pixelllmAnnotateKeys) {
  document.removeEventListener("keydown", window.__pixelllmAnnotateKeys, true);
  document.removeEventListener("keyup", window.__pixelllmAnnotateKeys, true);
}
window.__pixelllmAnnotateKeys = onKey;
document.addEventListener("keydown", onKey, true);
document.addEventListener("keyup", onKey, true);
