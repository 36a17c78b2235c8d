// PixelLLM annotate editor, part 3 of 3 (the parts and their order: annotate.js): unsaved edits — the copies kept
// in this browser (localStorage) and their restore, the leave-page prompt, autosave — then the editor's start,
// which is why this part is loaded last.
// Uses from annotate.js: btn, keptBar, keptText, rec, render, root, say, sourceLine, view, words

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
