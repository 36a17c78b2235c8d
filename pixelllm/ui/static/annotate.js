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
(function () {
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

  // ------------------------------------------------------------------ unsaved edits kept in this browser
  // The document and its history live on the server, so a reload (also gradio's own after a server restart, or the
  // one needed because gradio sends nothing more from a page whose server went away) used to lose unsaved edits. The
  // page therefore keeps a copy of its unsaved document in localStorage: one entry per opening of a document
  // (view.opened), rewritten at each render while there are unsaved edits, removed once they are saved, undone or
  // discarded; at most KEEP_MAX entries (the oldest go first, also when the storage is full). A copy holds what the
  // page shows (words, boxes, non-visual flags, timing, trace), the output and base correction it was made on
  // (view.source) and the time. When an output is opened again, the newest copy made on it (same image and
  // generation) is offered: Restore sends it to the server (trigger "restore"), which checks that it belongs to the
  // open output and makes it this editor's unsaved edits on the correction they were made on; the usual save stores
  // them. Discard removes the copies of this output. Without a usable localStorage (private mode, full, disabled)
  // the editor works as before and the source line says the edits are not kept.
  // A copy records the login it was made under (view.login: "" without --auth): only copies of the signed-in login
  // are offered or hinted, never another login's edits in the same browser profile. A tab with unsaved edits also
  // refreshes the `beat` of its copy (each render, every BEAT_MS, and 0 when the page is left): a copy with a beat
  // younger than LIVE_MS is being edited in another tab, so it is not offered there (only hinted), until that tab
  // saves, leaves or stops beating (closed, crashed).
  const KEEP_PREFIX = "pixelllm-annotate-unsaved:";
  const KEEP_MAX = 5;
  const BEAT_MS = 10000;
  // Chrome throttles the timers of a tab hidden for 5 minutes to once a minute: a live copy must outlast that
  const LIVE_MS = 90000;
  // a copy left untouched this long (no edit, no beat of a tab editing it) is dropped, not offered: the 5-copy cap
  // alone kept edits abandoned months ago and offered them on a base long since moved on, in clear text in a
  // possibly shared browser. Two weeks still cover a weekend, a holiday week or a server down for days.
  const KEEP_MAX_AGE_MS = 14 * 24 * 3600 * 1000;
  let kept = "";          // "1": the unsaved edits shown are kept in this browser, "0": they could not be kept
  let lastOpened = null;  // view.opened last rendered
  let offered = null;     // {copy, all}: the copy the bar offers, and every copy of this output
  let restoring = null;   // the copies a restore replaces, until the server has taken it
  let taken = null;       // {opened, all}: the copies a restore took over, dropped once kept again under view.opened
                          // or once their edits are no longer unsaved here (till then they stand in for a failed keep)
  function storage() {
    try { return window.localStorage || null; } catch (e) { return null; }  // disabled: a SecurityError
  }
  function keptKeys(s) {
    const keys = [];
    try { for (let k = 0; k < s.length; k++) { const key = s.key(k); if (key && key.indexOf(KEEP_PREFIX) === 0) keys.push(key); } }
    catch (e) { /* unreadable storage: nothing kept */ }
    return keys;
  }
  function keptCopies() {  // newest first; an unreadable entry counts as the oldest (the first to go); expired dropped
    const s = storage();
    if (!s) return [];
    const now = Date.now();
    const expired = (c) => !c.broken && c.opened !== view.opened
      && now - Math.max(c.saved_at, typeof c.beat === "number" ? c.beat : 0) > KEEP_MAX_AGE_MS;
    return keptKeys(s).map((key) => {
      let c = null;
      try { c = JSON.parse(s.getItem(key)); } catch (e) { c = null; }
      const ok = c && typeof c === "object" && c.source && typeof c.source === "object" && Array.isArray(c.words)
        && typeof c.saved_at === "number" && c.opened === key.slice(KEEP_PREFIX.length);
      return ok ? c : { opened: key.slice(KEEP_PREFIX.length), saved_at: -1, broken: true };
    }).filter((c) => {
      if (!expired(c)) return true;
      forget(c.opened);
      return false;
    }).sort((a, b) => b.saved_at - a.saved_at);
  }
  function forget(opened) {
    const s = storage();
    if (s && opened) { try { s.removeItem(KEEP_PREFIX + opened); } catch (e) { /* nothing to do */ } }
  }
  const idOrNull = (v) => (typeof v === "number" ? v : null);
  // again: our copy was just removed by another tab of this browser (its Discard, its restore of it, its pruning):
  // written back without dropping other copies (theirs may be live too: no tab evicts another in a loop)
  function keep(again) {  // this document's unsaved edits into the storage: "1" kept, "0" not, "" nothing to keep
    const src = view.source || {};
    if (!view.opened || !src.image_sha || !words().length) return "";
    const s = storage();
    if (!s) return "0";
    const now = Date.now();
    const copy = JSON.stringify({ v: 1, opened: view.opened, saved_at: now, beat: now, login: view.login || "", task: view.task,
      source: { image_sha: src.image_sha, generation_id: idOrNull(src.generation_id), correction_id: idOrNull(src.correction_id) },
      words: words().map((w) => ({ text: w.text, box: w.box, non_visual: !!w.non_visual })),
      timed_caption: view.timed_caption || [], traces: view.traces || [] });
    const key = KEEP_PREFIX + view.opened;
    let others = null;
    for (;;) {
      try { s.setItem(key, copy); break; } catch (e) {
        const full = e && (e.name === "QuotaExceededError" || e.name === "NS_ERROR_DOM_QUOTA_REACHED" || e.code === 22);
        if (!full || again) return "0";
        if (others === null) others = keptCopies().filter((c) => c.opened !== view.opened);
        if (!others.length) { forget(view.opened); return "0"; }  // too big even alone: no stale copy is left
        forget(others.pop().opened);  // full: the oldest other copy goes
      }
    }
    const keys = keptKeys(s);
    if (keys.length > KEEP_MAX && !again) keptCopies().filter((c) => c.opened !== view.opened).slice(KEEP_MAX - 1).forEach((c) => forget(c.opened));
    return "1";
  }
  function when(ms) {
    const d = new Date(ms);
    const hm = String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
    return d.toDateString() === new Date().toDateString() ? hm : d.toLocaleDateString() + " " + hm;
  }
  function label(source) {
    if (typeof source.correction_id === "number") return "correction #" + source.correction_id;
    return typeof source.generation_id === "number" ? "generation #" + source.generation_id + " (a new chain)" : "this output";
  }
  function beat(at) {  // refresh (or, at 0, clear) the beat of this page's copy: it is being edited here
    const s = storage();
    if (!s || !view.opened) return;
    const key = KEEP_PREFIX + view.opened;
    try {
      const c = JSON.parse(s.getItem(key));
      if (c && typeof c === "object" && Array.isArray(c.words)) { c.beat = at; s.setItem(key, JSON.stringify(c)); }
    } catch (e) { /* unreadable or full storage: the copy keeps its beat */ }
  }
  const ownLogin = (c) => (typeof c.login === "string" ? c.login : "") === (view.login || "");
  const beingEdited = (c) => c.opened !== view.opened && typeof c.beat === "number" && Math.abs(Date.now() - c.beat) < LIVE_MS;
  function hideOffer() { offered = null; keptBar.hidden = true; }
  function offerKept() {  // a document was just opened: offer the newest copy kept for this same output
    hideOffer();
    const src = view.source || {};
    if (!view.opened || !src.image_sha || !words().length) return;
    const gen = idOrNull(src.generation_id), head = idOrNull(src.correction_id);
    // the same output: the same image and generation (a correction without a generation: the same correction)
    const mine = keptCopies().filter((c) => !c.broken && c.opened !== view.opened && ownLogin(c) && !beingEdited(c) && c.source.image_sha === src.image_sha
      && idOrNull(c.source.generation_id) === gen && (gen !== null || (head !== null && idOrNull(c.source.correction_id) === head)));
    if (!mine.length) return;
    const c = mine[0];
    offered = { copy: c, all: mine.map((m) => m.opened) };
    let text = "Unsaved edits from " + when(c.saved_at) + " (" + c.words.length + " words) are kept in this browser for this output.";
    if (idOrNull(c.source.correction_id) !== head) {
      text += " They were made on " + label(c.source) + ", not on the open " + label(src) + ": restored, they are saved on "
        + label(c.source) + " as before (refused if someone else has saved on it since).";
    }
    keptText.textContent = text;
    btn("kept-restore").textContent = "Restore unsaved edits from " + when(c.saved_at);
    keptBar.hidden = false;
  }
  function hintKept() {  // an empty editor: say which outputs have unsaved edits waiting in this browser
    const copies = keptCopies().filter((c) => !c.broken && ownLogin(c));
    if (!copies.length) return;
    say("Unsaved edits are kept in this browser for " + copies.map((c) => label(c.source) + " (" + when(c.saved_at)
      + (beingEdited(c) ? ", being edited in another tab" : "") + ")").join(", ")
      + ": open it again (Browse) to restore them.", "warn");
  }
  function dropTaken() {
    if (taken) taken.all.forEach((o) => { if (o !== taken.opened) forget(o); });
    taken = null;
  }
  function syncKept() {  // each render: keep or drop this document's copy; offer a kept one after an open
    // the server refused the restore (the refusal's toast says why): its copies were not taken, and the offer comes
    // back as an open shows it (to try again, or to discard them). A refused restore used to leave `restoring` set,
    // and the offer of a copy another tab stops editing (the storage event) waited for it until the next Restore.
    if (view.restore_refused && restoring) { restoring = null; offerKept(); }
    // the server took the restored copy (it now lives under view.opened), or found it equal to the open version
    if (view.restored && restoring) { taken = { opened: view.opened, all: restoring }; restoring = null; }
    // whatever keep() does, the copies restored go with their edits: saved, undone or discarded (before any offer)
    if (taken && (taken.opened !== view.opened || !view.dirty)) dropTaken();
    if ((view.opened || null) !== lastOpened) {
      if (view.discarded && view.discarded === lastOpened) forget(view.discarded);  // opened again to discard them
      lastOpened = view.opened || null;
      offerKept();
    }
    if (view.opened && view.dirty) kept = keep();
    else { forget(view.opened); kept = ""; }
    if (kept === "1") dropTaken();  // kept again under view.opened
    root.dataset.kept = kept;
  }
  // Another tab of this browser removed this page's copy while its edits are still unsaved here (a Discard or a
  // restore of it there, its pruning of the oldest copies): the source line would say "kept in this browser" and a
  // reload would lose them. The copy is written back (or the line says it is not kept).
  if (window.__pixelllmAnnotateStorage) window.removeEventListener("storage", window.__pixelllmAnnotateStorage);
  window.__pixelllmAnnotateStorage = (evt) => {
    if (!root.isConnected || !view.opened || evt.storageArea !== storage()) return;
    // another tab's copy changed (its beat stopped: it left): an open document with nothing offered may be offered it
    if (evt.key && evt.key.indexOf(KEEP_PREFIX) === 0 && evt.key !== KEEP_PREFIX + view.opened && !offered && !view.dirty
      && !restoring) {
      offerKept();
      return;
    }
    if (!view.dirty || evt.newValue !== null) return;
    if (evt.key !== null && evt.key !== KEEP_PREFIX + view.opened) return;  // key null: the storage was cleared
    kept = keep(true);
    root.dataset.kept = kept;
    sourceLine();
  };
  window.addEventListener("storage", window.__pixelllmAnnotateStorage);
  // the heartbeat of this tab's copy, and its end when the page is left (after the leave-page prompt): a reload
  // offers it at once
  if (window.__pixelllmAnnotateBeat) clearInterval(window.__pixelllmAnnotateBeat);
  window.__pixelllmAnnotateBeat = setInterval(() => {
    if (root.isConnected && view.opened && view.dirty && kept === "1") beat(Date.now());
  }, BEAT_MS);
  if (window.__pixelllmAnnotateLeave) window.removeEventListener("pagehide", window.__pixelllmAnnotateLeave);
  window.__pixelllmAnnotateLeave = () => { if (root.isConnected && view.opened && view.dirty && kept === "1") beat(0); };
  window.addEventListener("pagehide", window.__pixelllmAnnotateLeave);
  btn("kept-restore").addEventListener("click", () => {
    if (!offered || rec || !view.words) return;
    const c = offered.copy;
    restoring = offered.all;
    hideOffer();
    trigger("restore", { source: c.source, opened: c.opened, login: typeof c.login === "string" ? c.login : "", task: c.task, words: c.words,
      timed_caption: c.timed_caption || [], traces: c.traces || [], rev: view.rev });
  });
  btn("kept-discard").addEventListener("click", () => {
    if (!offered) return;
    offered.all.forEach(forget);
    hideOffer();
    say("Discarded the unsaved edits kept in this browser for this output.");
  });

  // ------------------------------------------------------------------ leaving the page
  // Reloading or closing the page (or gradio reloading it after the server came back) drops the server-side
  // document and its history: with unsaved edits or a recording in progress the browser asks first.
  if (window.__pixelllmBeforeUnload) window.removeEventListener("beforeunload", window.__pixelllmBeforeUnload);
  window.__pixelllmBeforeUnload = (evt) => {
    if (!root.isConnected || !(view.dirty || rec)) return;
    evt.preventDefault();
    evt.returnValue = "";  // older browsers need it set to ask
  };
  window.addEventListener("beforeunload", window.__pixelllmBeforeUnload);

  // ------------------------------------------------------------------ autosave
  if (window.__pixelllmAutosave) clearInterval(window.__pixelllmAutosave);
  window.__pixelllmAutosave = setInterval(() => {
    if (root.isConnected && view.dirty && !rec) trigger("autosave", {});
  }, 30000);

  watch("value", render);
  render();
})();
