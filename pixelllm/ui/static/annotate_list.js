// PixelLLM annotate: the browse list (gr.HTML js_on_load). Value: {kind, rows: [{kind, id, image, status,
// annotator, reviewer, text, when}], message}. A click on a row sends trigger("open", {kind, id}).
// Every value is text (textContent): annotator names and captions are never parsed as HTML.
(function () {
  const root = element.querySelector(".pl-root");
  const msg = root.querySelector(".pl-msg");
  const head = root.querySelector("thead tr");
  const body = root.querySelector("tbody");
  const COLUMNS = {
    correction: [["id", "#"], ["status", "status"], ["annotator", "annotator"], ["reviewer", "reviewer"],
                 ["image", "image"], ["text", "caption"], ["when", "saved (UTC)"]],
    generation: [["id", "#"], ["status", "task"], ["image", "image"], ["text", "output"], ["annotator", "adapter"],
                 ["when", "time (UTC)"]],
  };
  function render() {
    const value = props.value && typeof props.value === "object" ? props.value : {};
    const cols = COLUMNS[value.kind] || COLUMNS.correction;
    msg.textContent = value.message || "";
    head.replaceChildren();
    body.replaceChildren();
    cols.forEach(([, label]) => {
      const th = document.createElement("th");
      th.textContent = label;
      head.appendChild(th);
    });
    (value.rows || []).forEach((row) => {
      const tr = document.createElement("tr");
      tr.className = "pl-row";
      tr.dataset.kind = row.kind;
      tr.dataset.id = String(row.id);
      tr.tabIndex = 0;
      cols.forEach(([key]) => {
        const td = document.createElement("td");
        td.className = "pl-" + key + (key === "status" ? " pl-status-" + String(row.status).replace(/[^a-z]/g, "") : "");
        td.textContent = row[key] === null || row[key] === undefined ? "" : String(row[key]);
        if (key === "text") td.title = td.textContent;
        tr.appendChild(td);
      });
      const open = () => trigger("open", { kind: row.kind, id: row.id });
      tr.addEventListener("click", open);
      tr.addEventListener("keydown", (evt) => { if (evt.key === "Enter" || evt.key === " ") { evt.preventDefault(); open(); } });
      body.appendChild(tr);
    });
  }
  watch("value", render);
  render();
})();
