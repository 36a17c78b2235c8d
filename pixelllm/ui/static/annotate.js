// PixelLLM annotate editor (gr.HTML js_on_load). Gradio runs this with `element`, `trigger`, `props`, `watch`;
// PIXELLLM_ANNOTATE_CSS is prepended by annotate_tab.py.
//
// The document (words, boxes, timing, trace) and its undo/redo history live on the server (pixelllm/ui/annotate.py);
// this script draws props.value and sends one edit at a time with trigger("edit", {op, ..., rev}), plus
// trigger("history", {op: "undo" | "redo"}), trigger("save", {status}) and trigger("autosave", {}).
// Recording happens here: words highlight in turn (at the pace, or on Space), pointer moves over the image are
// captured as LN points {x, y, t} (x, y normalised to the image, t = seconds since the start, performance.now),
// a new segment each time the pointer re-enters the image; at the end the trace and each word's start/end time
// go to the server, which derives the boxes with the LN reader's rule. Text only reaches the DOM via textContent.
// Unsaved edits are also kept in the browser (localStorage) and offered back when their output is opened again after
// a reload or a server restart (trigger("restore", copy)); see "unsaved edits kept in this browser" below.
//
// The editor is three files with one purpose each, joined in this order into the one js_on_load script by
// annotate_tab.py (`_assets`); they share the function scope gradio runs js_on_load in (which replaced the IIFE
// this editor used to wrap itself in), so the top-level names of one file are the other files' names too:
//   annotate.js          the page's elements, the state shared by all three (below), drawing, the word tools
//   annotate_input.js    pointer (mouse, touch, pen) on the image, recording a trace, the keyboard shortcuts
//   annotate_unsaved.js  unsaved edits: copies kept in this browser and their restore, the leave-page prompt,
//                        autosave; and the start (watch + first render), so it comes last
// Each file lists the names it uses from the others (tests/annotate/test_editor_script.py checks the lists).
// Uses from annotate_input.js: finish, now, replay, startRecording
// Uses from annotate_unsaved.js: hintKept, kept, syncKept
const NS = "http://www.w3.org/2000/svg";
if (!document.getElementById("pixelllm-annotate-css")) {
  const style = document.createElement("style");
  style.id = "pixelllm-annotate-css";
  style.textContent = PIXELLLM_ANNOTATE_CSS;
  document.head.appendChild(style);
}
const images = (window.__pixelllmAnnotateImages = window.__pixelllmAnnotateImages || new Map());
const $ = (sel) => element.querySelector(sel);
const root = $(".pa-root");
const stage = $(".pa-stage");
const svg = $(".pa-svg");
const wordsBox = $(".pa-words");
const statusEl = $(".pa-status");
const sourceEl = $(".pa-source");
const textIn = $(".pa-text");
const selectedEl = $(".pa-selected");
const nvBox = $(".pa-nonvisual");
const paceIn = $(".pa-pace");
const paceOut = $(".pa-pace-value");
const advanceIn = $(".pa-advance");
const boxModeIn = $(".pa-boxmode");
const keptBar = $(".pa-kept");
const keptText = $(".pa-kept-text");
const btn = (name) => $(".pa-" + name);

let view = {};
let sel = null;        // selected word index
let afterInsert = null; // {rev, words, sel}: the word to select when the server has added the inserted one
let hover = null;      // word under the pointer in the word list
let rec = null;        // the recording in progress
let drag = null;       // a box being moved or drawn
let corner = null;     // first corner in "click two corners" mode
let kbox = null;       // {i, box}: a box moved / resized with Shift+arrows, sent as one edit when Shift is released
let base = null;       // the <image> element (kept across renders)
let replayTimers = [];
let shownKey = null;

function el(name, attrs, parent) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}
const words = () => view.words || [];
const W = () => (view.image ? view.image.width : 1);
const H = () => (view.image ? view.image.height : 1);
function visible() { return root.isConnected && root.getClientRects().length > 0; }
function say(text, level) {
  statusEl.textContent = text || "";
  statusEl.title = text || "";
  statusEl.className = "pa-status" + (level === "error" ? " pa-error" : level === "warn" ? " pa-warn" : "");
}
function send(op) {
  if (!view.words || rec) return;
  op.rev = view.rev;
  trigger("edit", op);
}

// ------------------------------------------------------------------ drawing
function sourceLine() {
  const src = view.source || {};
  const parts = [];
  if (src.image) parts.push("image " + src.image);
  if (src.generation_id) parts.push("generation #" + src.generation_id);
  if (src.correction_id) parts.push("correction #" + src.correction_id + (src.status ? " (" + src.status + ")" : ""));
  if (view.dirty) parts.push("unsaved edits" + (kept === "1" ? " (kept in this browser)" : kept === "0"
    ? " (NOT kept in this browser: its storage is unavailable or full)" : ""));
  sourceEl.textContent = parts.join(" · ");
}
function render() {
  view = props.value && typeof props.value === "object" ? props.value : {};
  const img = view.image;
  const ws = words();
  root.dataset.words = String(ws.length);
  root.dataset.rev = String(view.rev || 0);
  root.dataset.dirty = view.dirty ? "1" : "0";
  root.dataset.status = img ? "ready" : "empty";
  root.dataset.points = String((view.traces || []).reduce((n, s) => n + s.length, 0));
  syncKept();
  if (view.message) say(view.message, view.level);
  else if (!img) hintKept();
  sourceLine();
  btn("undo").disabled = !view.can_undo;
  btn("redo").disabled = !view.can_redo;
  btn("record").disabled = !!rec || !view.recordable || !ws.length;
  btn("stop").disabled = !rec;
  btn("replay").disabled = !(view.traces || []).length;
  btn("clear-trace").disabled = !(view.traces || []).length;
  if (!img) {
    svg.replaceChildren();
    base = null;
    stage.classList.remove("pa-has-image");
    svg.removeAttribute("viewBox");
    wordsBox.replaceChildren();
    sel = null;
    updateTools();
    return;
  }
  if (img.src && images.get(img.key) !== img.src) {
    images.delete(img.key);
    images.set(img.key, img.src);
    while (images.size > 8) images.delete(images.keys().next().value);
  }
  if (shownKey !== img.key) { sel = null; shownKey = img.key; corner = null; }
  if (afterInsert && view.rev !== afterInsert.rev) {  // the answer to an insert: applied, or refused
    if (ws.length === afterInsert.words + 1) sel = afterInsert.sel;
    afterInsert = null;
  }
  if (sel !== null && sel >= ws.length) sel = ws.length ? ws.length - 1 : null;
  stage.classList.add("pa-has-image");
  svg.setAttribute("viewBox", "0 0 " + img.width + " " + img.height);
  Array.from(svg.children).forEach((c) => { if (c !== base) c.remove(); });
  if (!base || !base.isConnected) base = el("image", { x: 0, y: 0, preserveAspectRatio: "none", class: "pa-base" }, svg);
  base.setAttribute("width", img.width);
  base.setAttribute("height", img.height);
  const href = images.get(img.key);
  if (href && base.getAttribute("href") !== href) base.setAttribute("href", href);
  drawTrace(el("g", { class: "pa-trace-layer" }, svg), view.traces || [], view.timed_caption || []);
  drawBoxes(el("g", { class: "pa-boxes" }, svg));
  el("g", { class: "pa-live-layer" }, svg);
  drawWords();
  updateTools();
}

function colourAt(t, timed) {
  const ws = words();
  if (!ws.length) return "#dc2626";
  let k = 0;
  for (let i = 0; i < timed.length; i++) if (t >= timed[i].start_time) k = i;
  return (ws[Math.min(k, ws.length - 1)] || ws[0]).color;
}

// The trace in the words' gradient: each stretch of a segment takes the colour of the word spoken then.
function drawTrace(g, traces, timed, upTo) {
  g.replaceChildren();
  const w = W(), h = H();
  traces.forEach((seg) => {
    const pts = upTo === undefined ? seg : seg.filter((p) => p.t <= upTo);
    if (pts.length < 2) return;
    el("polyline", { class: "pa-trace-halo", points: pts.map((p) => p.x * w + "," + p.y * h).join(" ") }, g);
    let run = [pts[0]];
    let colour = colourAt(pts[0].t, timed);
    const flush = () => {
      if (run.length > 1) el("polyline", { class: "pa-trace", stroke: colour,
        points: run.map((p) => p.x * w + "," + p.y * h).join(" ") }, g);
    };
    for (let i = 1; i < pts.length; i++) {
      const c = colourAt(pts[i].t, timed);
      run.push(pts[i]);
      if (c !== colour) { flush(); run = [pts[i]]; colour = c; }
    }
    flush();
  });
}

function drawBoxes(g) {
  words().forEach((wd, i) => {
    const b = wd.box;
    const a = { x: b[0], y: b[1], width: Math.max(b[2] - b[0], 0.5), height: Math.max(b[3] - b[1], 0.5) };
    if (i === sel) el("rect", Object.assign({ class: "pa-box-halo" }, a), g);
    const r = el("rect", Object.assign({ class: "pa-box" + (wd.non_visual ? " pa-nv" : "") + (i === sel ? " pa-sel" : ""),
      stroke: wd.color, fill: i === sel ? wd.color : "none", "data-i": i }, a), g);
    const title = el("title", {}, r);
    title.textContent = wd.text;
    // Many words: only the selected / hovered word's box is drawn at full strength.
    const focus = sel !== null || hover !== null;
    if (i !== sel && i !== hover) r.style.opacity = focus ? "0.15" : (view.traces || []).length ? "0.3" : "0.7";
  });
  if (corner) el("circle", { class: "pa-corner", cx: corner[0], cy: corner[1], r: Math.max(W(), H()) / 90 }, g);
}

function focusedChip() {  // the index of the word chip with the keyboard focus, or null
  const a = document.activeElement;
  return a && a.classList && a.classList.contains("pa-word") && wordsBox.contains(a) ? Number(a.dataset.i) : null;
}
function focusChip(i) {
  const chip = i === null ? null : wordsBox.querySelector('.pa-word[data-i="' + i + '"]');
  if (chip) chip.focus();
}
function drawWords() {
  const had = focusedChip();  // a redraw (every edit) keeps the keyboard on its chip
  wordsBox.replaceChildren();
  words().forEach((wd, i) => {
    const chip = document.createElement("span");
    chip.className = "pa-word" + (wd.non_visual ? " pa-nv" : "") + (i === sel ? " pa-sel" : "");
    chip.dataset.i = String(i);
    chip.tabIndex = 0;  // reachable with Tab; Enter or Space selects it like a click
    chip.setAttribute("role", "button");
    chip.setAttribute("aria-pressed", String(i === sel));
    chip.addEventListener("keydown", (evt) => {
      if (evt.defaultPrevented) return;  // the editor's shortcuts took it (Space: next word while recording)
      if (evt.key === "Enter" || evt.key === " ") { evt.preventDefault(); chip.click(); }
    });
    chip.textContent = wd.text;
    chip.style.background = wd.color;
    chip.style.color = wd.ink || "#fff";
    chip.title = (wd.non_visual ? "non-visual · " : "") + "box " + wd.box.map((v) => Math.round(v)).join(", ");
    chip.addEventListener("click", () => select(i === sel ? null : i));
    chip.addEventListener("mouseenter", () => { hover = i; redrawBoxes(); });
    chip.addEventListener("mouseleave", () => { hover = null; redrawBoxes(); });
    wordsBox.appendChild(chip);
  });
  markRecording();
  if (had !== null) focusChip(Math.min(had, words().length - 1));
}

function markRecording() {
  wordsBox.querySelectorAll(".pa-word").forEach((c) => {
    const i = Number(c.dataset.i);
    c.classList.toggle("pa-current", !!rec && i === rec.i);
    c.classList.toggle("pa-pending", !!rec && i > rec.i);
  });
}

function redrawBoxes() {
  const g = svg.querySelector(".pa-boxes");
  if (g) { g.replaceChildren(); drawBoxes(g); }
}
function select(i) {
  sel = i;
  corner = null;
  redrawBoxes();
  wordsBox.querySelectorAll(".pa-word").forEach((c) => {
    c.classList.toggle("pa-sel", Number(c.dataset.i) === sel);
    c.setAttribute("aria-pressed", String(Number(c.dataset.i) === sel));
  });
  if (focusedChip() !== null && sel !== null) focusChip(sel);  // ← → from a chip take the focus along
  updateTools();
}

function updateTools() {
  const wd = sel === null ? null : words()[sel];
  selectedEl.textContent = wd ? "word " + (sel + 1) + " of " + words().length : "no word selected";
  if (document.activeElement !== textIn) textIn.value = wd ? wd.text : "";
  nvBox.checked = !!(wd && wd.non_visual);
  ["apply", "delete", "split"].forEach((n) => { btn(n).disabled = !wd; });
  btn("merge").disabled = !wd || sel >= words().length - 1;
  btn("insert").disabled = !view.words;
  nvBox.disabled = !wd;
}

// ------------------------------------------------------------------ word tools
btn("undo").addEventListener("click", () => { if (!rec) trigger("history", { op: "undo" }); });
btn("redo").addEventListener("click", () => { if (!rec) trigger("history", { op: "redo" }); });
btn("apply").addEventListener("click", () => { if (sel !== null) send({ op: "text", i: sel, text: textIn.value }); });
btn("insert").addEventListener("click", () => {
  const typed = textIn.value.trim();
  const current = sel === null ? null : words()[sel];
  const text = typed && (!current || typed !== current.text) ? typed : "word";
  const at = sel === null ? words().length - 1 : sel;
  afterInsert = { rev: view.rev, words: words().length, sel: at + 1 };  // selected once the server adds it
  send({ op: "insert", i: at, text: text });
});
btn("delete").addEventListener("click", () => { if (sel !== null) send({ op: "delete", i: sel }); });
btn("merge").addEventListener("click", () => { if (sel !== null) send({ op: "merge", i: sel }); });
btn("split").addEventListener("click", () => {
  if (sel === null) return;
  const typed = textIn.value.split(/\s+/).filter(Boolean).join(" ");  // as the server normalises it
  if (typed && typed !== words()[sel].text) { send({ op: "text", i: sel, text: typed }); return; }  // typed
  // spaces split it as typed; the cursor is a split point only in the text the server holds
  const at = document.activeElement === textIn || textIn.selectionStart ? textIn.selectionStart : null;
  send({ op: "split", i: sel, at: at || null });
});
nvBox.addEventListener("change", () => { if (sel !== null) send({ op: "non_visual", i: sel, value: nvBox.checked }); });
textIn.addEventListener("keydown", (evt) => {
  if (evt.key === "Enter" && sel !== null) { evt.preventDefault(); send({ op: "text", i: sel, text: textIn.value }); }
});
paceIn.addEventListener("input", () => { paceOut.textContent = Number(paceIn.value).toFixed(1); });
btn("clear-trace").addEventListener("click", () => send({ op: "clear_trace" }));
btn("replay").addEventListener("click", replay);
btn("record").addEventListener("click", (evt) => { evt.currentTarget.blur(); startRecording(); });
btn("stop").addEventListener("click", (evt) => { evt.currentTarget.blur(); if (rec) finish(now()); });
