// PixelLLM Studio page script (gr.HTML js_on_load on a hidden host: layout.py `page_script`): accessibility for
// gradio's own widgets, which gradio 6 leaves out. Runs once per page; a MutationObserver keeps it applied as
// gradio renders (the examples' next page, a tab selected by a click or by the server).
// - Example images: gradio renders each as a <button> holding only an <img alt="">, which a screen reader reads
//   as "button". Each gets a name from its file (gr.Examples(example_labels=) would name them, but it replaces
//   the thumbnails with the label text).
// - Tabs: gradio's tab bar has role=tablist/tab but no keys of its own. WAI-ARIA tabs pattern, manual activation:
//   Left/Right move the focus between tabs (wrapping), Home/End to the first/last; Enter or Space opens the
//   focused tab (its native <button> click). Selecting a tab makes the server work (the Annotate tab loads its
//   list) and mounts its viewer, so arrows only move the focus. Only the selected tab is a Tab stop: Tab goes
//   from it into the panel.
// - Tab panels: gradio gives each panel (role=tabpanel) no name. Each is labelled by its tab (aria-labelledby = the
//   tab's id), paired only where gradio itself pairs them: the tab's aria-controls names the panel's id (both come
//   from the Tab's elem_id; the tab's id is "<elem_id>-button"). A Tab without elem_id gets neither, and panels are
//   mounted only when first opened, so the n-th panel of the page is not the n-th tab: such a panel stays unnamed.
//   So would the panel of a tab in gradio's "More tabs" menu, whose buttons have no role, id or aria-controls (a
//   label set earlier is then taken off rather than left pointing at nothing); the studio's tab bar wraps instead
//   (layout.py: gr.Tabs(overflow_behavior="wrap")), so on a narrow screen too every tab stays on the bar.
(function () {
  if (window.__pixelllmPage) return;
  window.__pixelllmPage = true;

  function nameExamples() {
    document.querySelectorAll("button.gallery-item").forEach((button) => {
      const img = button.querySelector("img");
      if (!img || button.textContent.trim()) return;  // a text example names itself
      const path = (img.getAttribute("src") || "").split(/[?#]/)[0];
      let file = path.slice(path.lastIndexOf("/") + 1);
      try { file = decodeURIComponent(file); } catch (e) { /* keep it as it is */ }
      const name = "Load example image" + (file ? " " + file : "");
      if (button.getAttribute("aria-label") !== name) button.setAttribute("aria-label", name);
    });
  }

  function labelPanels() {
    const claims = new Map();  // panel id -> the tabs whose aria-controls name it
    document.querySelectorAll('[role="tab"][aria-controls]').forEach((tab) => {
      const id = tab.getAttribute("aria-controls");
      if (id) claims.set(id, (claims.get(id) || []).concat(tab));
    });
    claims.forEach((tabs, id) => {
      const panels = document.querySelectorAll('[id="' + CSS.escape(id) + '"]');
      // certain only for one tab and one element with that id, a tab panel
      if (tabs.length !== 1 || panels.length !== 1 || panels[0].getAttribute("role") !== "tabpanel") return;
      const tab = tabs[0], panel = panels[0];
      if (!tab.id) {  // gradio names it "<elem_id>-button"; a tab it left without one gets a free id of that form
        let name = id + "-tab", n = 1;
        while (document.getElementById(name)) name = id + "-tab-" + ++n;
        tab.id = name;
      }
      if (panel.getAttribute("aria-labelledby") !== tab.id) panel.setAttribute("aria-labelledby", tab.id);
      panel.dataset.pixelllmLabelled = "1";
    });
    // a label this script set whose tab has left the page (moved into the More tabs menu) is taken off
    document.querySelectorAll('[role="tabpanel"][data-pixelllm-labelled]').forEach((panel) => {
      const tab = document.getElementById(panel.getAttribute("aria-labelledby") || "");
      if (!tab || tab.getAttribute("aria-controls") !== panel.id) {
        panel.removeAttribute("aria-labelledby");
        delete panel.dataset.pixelllmLabelled;
      }
    });
  }

  function tabsOf(list) {  // the tabs a key can reach: shown (not in the More tabs menu), enabled
    return Array.from(list.querySelectorAll('[role="tab"]')).filter((t) => !t.disabled && t.getClientRects().length);
  }

  function roveTabs() {
    document.querySelectorAll('[role="tablist"]').forEach((list) => {
      const reachable = tabsOf(list);
      // the selected tab; the first one when the selected tab sits in the More tabs menu (a narrow screen)
      const stop = reachable.find((t) => t.getAttribute("aria-selected") === "true") || reachable[0];
      list.querySelectorAll('[role="tab"]').forEach((t) => {
        const index = t === stop ? "0" : "-1";
        if (t.getAttribute("tabindex") !== index) t.setAttribute("tabindex", index);
      });
    });
  }

  document.addEventListener("keydown", (evt) => {
    if (evt.altKey || evt.ctrlKey || evt.metaKey || evt.shiftKey || !evt.target.closest) return;
    const tab = evt.target.closest('[role="tab"]');
    const list = tab && tab.closest('[role="tablist"]');
    if (!list) return;
    const tabs = tabsOf(list);
    const i = tabs.indexOf(tab);
    if (i < 0 || !tabs.length) return;
    const forward = getComputedStyle(list).direction === "rtl" ? -1 : 1;
    const step = { ArrowRight: forward, ArrowLeft: -forward }[evt.key];
    let to = null;
    if (step) to = tabs[(i + step + tabs.length) % tabs.length];
    else if (evt.key === "Home") to = tabs[0];
    else if (evt.key === "End") to = tabs[tabs.length - 1];
    if (!to) return;
    evt.preventDefault();
    to.focus();
  });

  let queued = false;
  function apply() {
    queued = false;
    nameExamples();
    roveTabs();
    labelPanels();
  }
  // attribute filter: a tab selected (aria-selected) or an example's picture changed (src); panels and tabs come
  // and go as child nodes. The names, tab stops and labels this sets are not watched, so it does not wake itself
  new MutationObserver(() => {
    if (!queued) { queued = true; requestAnimationFrame(apply); }
  }).observe(document.body, { childList: true, subtree: true, attributes: true,
                              attributeFilter: ["aria-selected", "src"] });
  apply();
})();
