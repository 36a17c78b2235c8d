// PixelLLM viewer (gr.HTML js_on_load): the image with an SVG overlay, redrawn from props.value.
// Gradio runs this with `element`, `trigger`, `props`, `watch`; PIXELLLM_VIEWER_CSS is prepended by layout.py.
// The server streams JSON (words with boxes and colours, regions, prompts); everything is drawn here, so no
// image is re-encoded per word. Model and user text only ever reaches the DOM through textContent.
(function () {
  const NS = "http://www.w3.org/2000/svg";
  if (!document.getElementById("pixelllm-viewer-css")) {
    const style = document.createElement("style");
    style.id = "pixelllm-viewer-css";
    style.textContent = PIXELLLM_VIEWER_CSS;
    document.head.appendChild(style);
  }
  // Image data URLs arrive once per upload; later updates name the image by key only.
  const images = (window.__pixelllmImages = window.__pixelllmImages || new Map());
  const root = element.querySelector(".px-root");
  const stage = root.querySelector(".px-stage");
  const svg = root.querySelector(".px-svg");
  const wordsBox = root.querySelector(".px-words");
  const inspectBox = root.querySelector(".px-inspect");
  const regionsBox = root.querySelector(".px-regions");
  const statusEl = root.querySelector(".px-status");
  const replayBtn = root.querySelector(".px-replay");
  const kbdPos = root.querySelector(".px-kbd-pos");
  const announceEl = root.querySelector(".px-announce");

  let view = {};
  let shown = 0;        // words already drawn: newer ones get the arrival animation
  let shownKey = null;
  let pinned = null;    // word index pinned by a click
  let timers = [];
  let drag = null;
  let base = null;      // the <image> element holding the picture
  let kbd = null;       // the keyboard cursor [x, y] (image pixels): arrow keys move it, Enter / Space click there
  // The caption's live region: the status line is busy while words stream, and a region saying every word would
  // talk over itself. It says the new words at most every ANNOUNCE_EVERY_MS while a caption streams, then the
  // whole caption once it is done.
  const ANNOUNCE_EVERY_MS = 5000;
  let lastStatus = null;  // null until the first render: a viewer mounted on a finished caption stays quiet
  let lastDone = "";      // what the last finished caption's announcement was for (its message and words)
  let said = 0;           // words of the streaming caption already said
  let saidAt = 0;         // when they were (performance.now())
  let sayTimer = null;

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }
  function pressOnEnter(evt) {  // a focusable chip or row: Enter / Space act as a click
    if (evt.key === "Enter" || evt.key === " ") { evt.preventDefault(); evt.currentTarget.click(); }
  }
  function centre(b) { return [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]; }
  function clearTimers() { timers.forEach(clearTimeout); timers = []; }
  function size() { return view.image ? Math.max(view.image.width, view.image.height) : 256; }

  function render() {
    const active = document.activeElement;  // a chip or row focused from the keyboard keeps the focus
    const refocus = active && root.contains(active) && active.dataset.i !== undefined
      ? "." + active.className.split(" ")[0] + '[data-i="' + active.dataset.i + '"]' : null;
    view = props.value && typeof props.value === "object" ? props.value : {};
    clearTimers();
    root.dataset.replaying = "0";  // a replay's last timer, which said so, was just cleared
    const img = view.image;
    const words = view.words || [];
    root.dataset.status = view.status || "idle";
    root.dataset.words = String(words.length);
    root.dataset.mode = view.mode || "";
    statusEl.textContent = view.message || "";
    // a live region re-announced "Generating… N words" for every streamed word: held while streaming, the final
    // message is announced once
    statusEl.setAttribute("aria-busy", view.status === "streaming" ? "true" : "false");
    replayBtn.disabled = words.length === 0 || view.status === "streaming";
    replayBtn.style.display = view.mode === "refer" ? "none" : "";
    wordsBox.replaceChildren();
    inspectBox.replaceChildren();
    regionsBox.replaceChildren();
    if (!img) {
      svg.replaceChildren();
      base = null;
      stage.classList.remove("px-has-image");
      svg.removeAttribute("viewBox");
      shown = 0;
      kbd = null;
      keyboardReady();
      return;
    }
    if (img.src && images.get(img.key) !== img.src) {
      images.delete(img.key);
      images.set(img.key, img.src);
      while (images.size > 8) images.delete(images.keys().next().value);  // keep the page's memory bounded
    }
    const src = images.get(img.key);
    if (shownKey !== img.key) { shown = 0; pinned = null; shownKey = img.key; kbd = null; }
    if (words.length < shown) shown = 0;
    if (pinned !== null && pinned >= words.length) pinned = null;
    stage.classList.add("px-has-image");
    svg.setAttribute("viewBox", "0 0 " + img.width + " " + img.height);
    svg.classList.toggle("px-clickable", !!view.clickable);
    keyboardReady();
    // The picture stays one element across renders (no re-decoding per streamed word); overlays are redrawn.
    Array.from(svg.children).forEach((c) => { if (c !== base) c.remove(); });
    if (!base || !base.isConnected) {
      base = el("image", { x: 0, y: 0, preserveAspectRatio: "none", class: "px-base" }, svg);
    }
    base.setAttribute("width", img.width);
    base.setAttribute("height", img.height);
    if (src && base.getAttribute("href") !== src) base.setAttribute("href", src);
    drawRegions(svg, view.regions || [], view.selected);
    drawTrace(svg, words);
    drawInspect(svg, view.inspect, words);
    drawPrompts(svg);
    el("g", { class: "px-hl" }, svg);
    el("g", { class: "px-live" }, svg);
    drawWords(words);
    drawRegionList(view.regions || [], view.selected);
    drawCursor();
    announce(words);
    shown = words.length;
    if (pinned !== null) highlight(pinned);
    const again = refocus ? root.querySelector(refocus) : null;
    if (again) again.focus({ preventScroll: true });
  }

  function say(text) {
    // emptied first, filled a moment later: the same caption twice (greedy decoding) is said again
    clearTimeout(sayTimer);
    announceEl.textContent = "";
    if (text) sayTimer = setTimeout(() => { announceEl.textContent = text; }, 100);
  }

  function announce(words) {
    const status = view.status || "idle";
    const first = lastStatus === null;
    const now = performance.now();
    if (status === "streaming") {
      if (lastStatus !== "streaming" || words.length < said) {  // a new caption: nothing said of it yet
        said = 0;
        saidAt = now;
        say("");
      } else if (words.length > said && now - saidAt >= ANNOUNCE_EVERY_MS) {
        say(words.slice(said).map((w) => w.text).join(" "));
        said = words.length;
        saidAt = now;
      }
    } else if (status === "done" && words.length) {
      const text = words.map((w) => w.text).join(" ");
      const key = (view.message || "") + "\n" + text;
      if (!first && (lastStatus !== "done" || key !== lastDone)) {
        say((view.mode === "dense" ? "Region caption: " : "Caption: ") + text);
      }
      lastDone = key;
    }
    lastStatus = status;
  }

  function drawTrace(parent, words) {
    const g = el("g", { class: "px-trace" }, parent);
    const r = size() / 90;
    words.forEach((w, i) => {
      const c = centre(w.box);
      const p = i > 0 ? centre(words[i - 1].box) : c;
      const seg = el("g", { class: "px-seg" + (i >= shown ? " px-new" : ""), "data-i": i }, g);
      el("line", { class: "px-halo", x1: p[0], y1: p[1], x2: c[0], y2: c[1] }, seg);
      el("line", { class: "px-line", x1: p[0], y1: p[1], x2: c[0], y2: c[1], stroke: w.color }, seg);
      const dot = el("circle", { class: "px-dot", cx: c[0], cy: c[1], r: r, fill: w.color }, seg);
      const title = el("title", {}, dot);
      title.textContent = w.text;
      seg.addEventListener("mouseenter", () => highlight(i));
      seg.addEventListener("mouseleave", () => highlight(pinned));
    });
  }

  function drawWords(words) {
    words.forEach((w, i) => {
      const chip = document.createElement("span");
      chip.className = "px-word";
      chip.dataset.i = String(i);
      chip.textContent = w.text;
      chip.style.background = w.color;
      chip.style.color = w.ink || "#fff";
      chip.title = "box " + w.box.map((v) => Math.round(v)).join(", ");
      if (i === pinned) chip.classList.add("px-pinned");
      chip.addEventListener("mouseenter", () => highlight(i));
      chip.addEventListener("mouseleave", () => highlight(pinned));
      chip.tabIndex = 0;  // reachable with Tab; Enter or Space pins it like a click
      chip.setAttribute("role", "button");
      chip.setAttribute("aria-pressed", String(i === pinned));
      chip.addEventListener("focus", () => highlight(i));
      chip.addEventListener("blur", () => highlight(pinned));
      chip.addEventListener("click", () => {
        pinned = pinned === i ? null : i;
        wordsBox.querySelectorAll(".px-word").forEach((c) => {
          c.classList.toggle("px-pinned", Number(c.dataset.i) === pinned);
          c.setAttribute("aria-pressed", String(Number(c.dataset.i) === pinned));
        });
        highlight(pinned);
      });
      chip.addEventListener("keydown", pressOnEnter);
      wordsBox.appendChild(chip);
    });
  }

  function highlight(i) {
    const hl = svg.querySelector(".px-hl");
    if (!hl) return;
    hl.replaceChildren();
    wordsBox.querySelectorAll(".px-word").forEach((c) => c.classList.toggle("px-active", Number(c.dataset.i) === i));
    const w = i === null || i === undefined ? null : (view.words || [])[i];
    if (!w) return;
    const b = w.box;
    el("rect", { class: "px-hl-box", x: b[0], y: b[1], width: Math.max(b[2] - b[0], 0.5),
                 height: Math.max(b[3] - b[1], 0.5), stroke: w.color, fill: w.color, "data-i": i }, hl);
  }

  function drawInspect(parent, inspect, words) {
    if (!inspect) return;
    const g = el("g", { class: "px-inspect-layer" }, parent);
    (inspect.hits || []).forEach((i) => {
      const w = words[i];
      if (!w) return;
      const b = w.box;
      el("rect", { class: "px-inspect-box", x: b[0], y: b[1], width: b[2] - b[0], height: b[3] - b[1],
                   stroke: w.color }, g);
    });
    const s = size() / 40;
    el("line", { class: "px-cross", x1: inspect.x - s, y1: inspect.y, x2: inspect.x + s, y2: inspect.y }, g);
    el("line", { class: "px-cross", x1: inspect.x, y1: inspect.y - s, x2: inspect.x, y2: inspect.y + s }, g);
    const head = document.createElement("span");
    const hits = inspect.hits || [];
    head.textContent = hits.length
      ? "Words whose box covers (" + Math.round(inspect.x) + ", " + Math.round(inspect.y) + "): "
      : "No word box covers (" + Math.round(inspect.x) + ", " + Math.round(inspect.y) + ").";
    inspectBox.appendChild(head);
    hits.forEach((i) => {
      const w = words[i];
      if (!w) return;
      const chip = document.createElement("span");
      chip.className = "px-word px-hit-item";
      chip.textContent = w.text;
      chip.style.background = w.color;
      chip.style.color = w.ink || "#fff";
      chip.addEventListener("mouseenter", () => highlight(i));
      chip.addEventListener("mouseleave", () => highlight(pinned));
      inspectBox.appendChild(chip);
    });
    // Mark the hits in the caption too (after the chips exist).
    queueMicrotask(() => wordsBox.querySelectorAll(".px-word").forEach((c) =>
      c.classList.toggle("px-hit", hits.includes(Number(c.dataset.i)))));
  }

  function drawPrompts(parent) {
    const g = el("g", { class: "px-prompts" }, parent);
    const b = view.box;
    if (b) {
      const a = { x: b[0], y: b[1], width: b[2] - b[0], height: b[3] - b[1] };
      el("rect", Object.assign({ class: "px-prompt-box-halo" }, a), g);
      el("rect", Object.assign({ class: "px-prompt-box" }, a), g);
    }
    const r = size() / 70;
    (view.points || []).forEach((p) => {
      el("circle", { class: "px-point " + (p[2] === 1 ? "px-pos" : "px-neg"), cx: p[0], cy: p[1], r: r,
                     fill: p[2] === 1 ? "#16a34a" : "#dc2626" }, g);
    });
    if (view.pending) {
      el("circle", { class: "px-pending", cx: view.pending[0], cy: view.pending[1], r: r * 1.4 }, g);
    }
  }

  function drawRegions(parent, regions, selected) {
    const masks = el("g", { class: "px-masks" }, parent);
    const boxes = el("g", { class: "px-boxes" }, parent);
    const fs = size() / 22;
    const placed = [];  // label anchors so far: a label that would cover another moves right
    regions.forEach((reg, i) => {
      if (reg.mask) {
        el("image", { class: "px-mask" + (reg.low ? " px-low" : ""), href: reg.mask, x: 0, y: 0,
                      width: view.image.width, height: view.image.height, preserveAspectRatio: "none",
                      "data-i": i }, masks);
      }
      const b = reg.box;
      el("rect", { class: "px-region" + (i === selected ? " px-selected" : "") + (reg.low ? " px-low" : ""),
                   x: b[0], y: b[1], width: Math.max(b[2] - b[0], 0.5), height: Math.max(b[3] - b[1], 0.5),
                   stroke: reg.color, "data-i": i }, boxes);
      let x = b[0] + fs * 0.2;
      const y = Math.max(b[1] - fs * 0.25, fs);
      while (placed.some(([px, py, w]) => Math.abs(py - y) < fs && x < px + w && px < x + fs * 0.7)) x += fs * 0.7;
      placed.push([x, y, fs * 0.65 * String(i + 1).length]);
      const label = el("text", { class: "px-region-label", x, y, fill: reg.color, "font-size": fs }, boxes);
      label.textContent = String(i + 1);
    });
  }

  function drawRegionList(regions, selected) {
    const clickable = view.mode === "dense";
    if (clickable) regionsBox.removeAttribute("role"); else regionsBox.setAttribute("role", "list");
    regionsBox.setAttribute("aria-label", clickable ? "regions (Enter shows a region's traced caption)" : "results");
    regions.forEach((reg, i) => {
      const row = document.createElement("div");
      row.className = "px-region-row" + (clickable ? " px-clickable" : "") + (i === selected ? " px-selected" : "") +
        (reg.low ? " px-low" : "");
      row.dataset.i = String(i);
      const sw = document.createElement("span");
      sw.className = "px-swatch";
      sw.style.background = reg.color;
      const num = document.createElement("b");
      num.textContent = String(i + 1);
      const label = document.createElement("span");
      label.className = "px-region-text";
      label.textContent = reg.label;
      const score = document.createElement("span");
      score.className = "px-region-score";
      score.textContent = reg.detail || "";
      row.append(sw, num, label, score);
      // what a screen reader says of the row: its number, text, score and box (the picture's boxes are unnamed)
      const b = reg.box ? " — box " + reg.box.map((v) => Math.round(v)).join(", ") : "";
      row.setAttribute("aria-label", (i + 1) + ". " + reg.label + (reg.detail ? ", " + reg.detail : "") + b);
      if (clickable) row.setAttribute("aria-current", String(i === selected));
      else row.setAttribute("role", "listitem");
      row.addEventListener("mouseenter", () => outline(i, true));
      row.addEventListener("mouseleave", () => outline(i, false));
      if (clickable) {
        row.tabIndex = 0;
        row.setAttribute("role", "button");
        row.addEventListener("click", () => trigger("region", { i: i }));
        row.addEventListener("keydown", pressOnEnter);
      }
      regionsBox.appendChild(row);
    });
  }

  function outline(i, on) {
    svg.querySelectorAll(".px-region").forEach((r) => {
      if (Number(r.dataset.i) === i) r.classList.toggle("px-selected", on || i === view.selected);
    });
  }

  function replay() {
    const segs = Array.from(svg.querySelectorAll(".px-seg"));
    const chips = Array.from(wordsBox.querySelectorAll(".px-word"));
    if (!segs.length) return;
    clearTimers();
    segs.forEach((s) => { s.classList.add("px-hidden"); s.classList.remove("px-new"); });
    chips.forEach((c) => c.classList.add("px-hidden"));
    root.dataset.replaying = "1";
    const step = Math.max(40, Math.min(250, 4000 / segs.length));
    segs.forEach((s, i) => {
      timers.push(setTimeout(() => {
        s.classList.remove("px-hidden");
        s.classList.add("px-new");
        if (chips[i]) chips[i].classList.remove("px-hidden");
        highlight(i);
        if (i === segs.length - 1) {
          root.dataset.replaying = "0";
          timers.push(setTimeout(() => highlight(pinned), step));
        }
      }, step * (i + 1)));
    });
  }
  replayBtn.addEventListener("click", replay);

  // Pointer: a click sends "pick" {x, y}; a drag sends "drag" {box}. Coordinates: image pixels.
  // Image pixels of a pointer event, clamped to the image; with `strict`, null outside it (the grey band beside
  // a tall or wide image is not the image: a click there used to add a prompt on the image's edge)
  function toImage(evt, strict) {
    const ctm = svg.getScreenCTM();
    if (!ctm || !view.image) return null;
    const p = new DOMPoint(evt.clientX, evt.clientY).matrixTransform(ctm.inverse());
    if (strict && (p.x < 0 || p.y < 0 || p.x > view.image.width || p.y > view.image.height)) return null;
    const x = Math.min(Math.max(p.x, 0), view.image.width);
    const y = Math.min(Math.max(p.y, 0), view.image.height);
    return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
  }
  // A finger is not a mouse: a tap moves it a few pixels, so touch and pen get a wider slop before a press counts
  // as a drag (6 px made many taps tiny boxes instead of points).
  function slop(evt) { return evt.pointerType === "mouse" ? 6 : 10; }
  function dropDrag() {
    drag = null;
    const live = svg.querySelector(".px-live");
    if (live) live.replaceChildren();
  }
  svg.addEventListener("pointerdown", (evt) => {
    // A second finger (a pinch) ends the gesture: it is neither a click nor a drag.
    if (drag && evt.pointerId !== drag.id) { dropDrag(); return; }
    if (!view.clickable || evt.button !== 0) return;
    const p = toImage(evt, true);  // a drag may leave the image (clamped); it starts on it
    if (!p) return;
    drag = { id: evt.pointerId, start: p, sx: evt.clientX, sy: evt.clientY, moved: false, slop: slop(evt) };
    try { svg.setPointerCapture(evt.pointerId); } catch (e) { /* capture is optional */ }
    evt.preventDefault();
  });
  svg.addEventListener("pointermove", (evt) => {
    if (!drag || evt.pointerId !== drag.id) return;
    if (Math.hypot(evt.clientX - drag.sx, evt.clientY - drag.sy) > drag.slop) drag.moved = true;
    const live = svg.querySelector(".px-live");
    if (!drag.moved || !live) return;
    const p = toImage(evt);
    if (!p) return;
    live.replaceChildren();
    el("rect", { class: "px-rubber", x: Math.min(p[0], drag.start[0]), y: Math.min(p[1], drag.start[1]),
                 width: Math.abs(p[0] - drag.start[0]), height: Math.abs(p[1] - drag.start[1]) }, live);
  });
  svg.addEventListener("pointerup", (evt) => {
    if (!drag || evt.pointerId !== drag.id) return;
    const d = drag;
    drag = null;
    const p = toImage(evt);
    if (!p) return;
    if (d.moved) trigger("drag", { box: [d.start[0], d.start[1], p[0], p[1]] });
    else trigger("pick", { x: d.start[0], y: d.start[1] });
  });
  svg.addEventListener("pointercancel", dropDrag);  // e.g. the browser took a pinch-zoom over

  // Keyboard: a clickable image is a Tab stop; the arrow keys move a cursor (a step is 1/32 of the image, with
  // Shift 1/8) and Enter / Space send "pick" there, as a click does (points, box corners, inspect, a region).
  function keyboardReady() {
    const on = !!(view.clickable && view.image);
    if (on) svg.setAttribute("tabindex", "0"); else svg.removeAttribute("tabindex");
    svg.setAttribute("role", on ? "application" : "img");
    svg.setAttribute("aria-roledescription", "image");
    svg.setAttribute("aria-label", on ? "image: arrow keys move a cursor (Shift: faster), Enter or Space clicks there"
      : "image with overlay");
    if (!on && document.activeElement === svg) svg.blur();
  }
  function drawCursor() {
    const old = svg.querySelector(".px-kbd");
    if (old) old.remove();
    if (!kbd || !view.image || !svg.matches(":focus-visible")) return;  // not for a mouse click's focus
    const s = size() / 40;
    const g = el("g", { class: "px-kbd" }, svg);
    el("circle", { class: "px-kbd-ring", cx: kbd[0], cy: kbd[1], r: s }, g);
    el("line", { class: "px-kbd-line", x1: kbd[0] - 2 * s, y1: kbd[1], x2: kbd[0] + 2 * s, y2: kbd[1] }, g);
    el("line", { class: "px-kbd-line", x1: kbd[0], y1: kbd[1] - 2 * s, x2: kbd[0], y2: kbd[1] + 2 * s }, g);
  }
  function sayCursor() { kbdPos.textContent = kbd ? "cursor at " + Math.round(kbd[0]) + ", " + Math.round(kbd[1]) : ""; }
  const STEPS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  svg.addEventListener("focus", () => {
    if (!kbd && view.image) kbd = [view.image.width / 2, view.image.height / 2];
    drawCursor();
    sayCursor();
  });
  svg.addEventListener("blur", () => { drawCursor(); kbdPos.textContent = ""; });
  svg.addEventListener("keydown", (evt) => {
    if (!view.clickable || !view.image || !kbd || evt.ctrlKey || evt.metaKey || evt.altKey) return;
    const d = STEPS[evt.key];
    if (d) {
      evt.preventDefault();
      const step = size() / (evt.shiftKey ? 8 : 32);
      kbd = [Math.min(Math.max(kbd[0] + d[0] * step, 0), view.image.width),
             Math.min(Math.max(kbd[1] + d[1] * step, 0), view.image.height)];
      drawCursor();
      sayCursor();
    } else if (evt.key === "Enter" || evt.key === " ") {
      evt.preventDefault();
      if (!evt.repeat) trigger("pick", { x: Math.round(kbd[0] * 10) / 10, y: Math.round(kbd[1] * 10) / 10 });
    }
  });

  watch("value", render);
  render();
})();
