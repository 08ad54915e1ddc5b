// littune web app: talks to the JSON API of `littune serve`. Plain DOM, no build step.
// Every text that comes from the user or the server is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let chosenFile = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

function showError(id, message) {
  const node = $(id);
  node.textContent = message || "";
  node.hidden = !message;
}

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  $("view-classify").hidden = name !== "classify";
  $("view-search").hidden = name !== "search";
}

// -- start: what the server offers ------------------------------------------------------------
async function init() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  try {
    const health = await api("/api/health");
    const m = health.model;
    $("model-info").textContent = `${m.name} · ${m.setting} · ${m.image_tower}` +
      (health.index.loaded ? ` · index of ${health.index.size} images` : "");
    const select = $("templates");
    select.replaceChildren(...health.template_sets.map((name) => {
      const option = el("option", "", name);
      option.value = name;
      option.selected = name === "short";
      return option;
    }));
    $("k").max = health.limits.max_k;
    if (health.index.loaded) {
      $("tab-search").disabled = false;
      $("tab-search").title = "";
    }
  } catch (e) {
    showError("classify-error", `cannot reach the server: ${e.message}`);
  }
  document.body.dataset.ready = "1";
}

// -- classify -----------------------------------------------------------------------------------
function choose(file) {
  chosenFile = file || null;
  Heat.clear();
  const preview = $("preview");
  if (!chosenFile) { preview.hidden = true; $("drop-text").hidden = false; return; }
  preview.src = URL.createObjectURL(chosenFile);
  preview.alt = `the chosen image, ${chosenFile.name}`;
  preview.hidden = false;
  $("drop-text").hidden = true;
}

function renderBars(labels) {
  const list = $("results");
  list.replaceChildren(...labels.map((item, rank) => {
    const row = el("li", "bar-row");
    row.dataset.label = item.label;
    row.dataset.rank = String(rank + 1);
    const label = el("button", "label", item.label);  // a button: keyboard and screen readers reach it
    label.type = "button";
    label.dataset.label = item.label;
    label.title = `show where “${item.label}” matches in the image`;
    label.setAttribute("aria-pressed", "false");
    label.addEventListener("click", () => Heat.showLabel(item.label));
    const track = el("span", "track");
    const fill = el("span", "fill");
    fill.style.display = "block";
    fill.style.width = `${(100 * item.probability).toFixed(1)}%`;
    track.append(fill);
    row.append(label, track, el("span", "prob", `${(100 * item.probability).toFixed(1)}%`));
    return row;
  }));
}

async function classify(event) {
  event.preventDefault();
  showError("classify-error", "");
  if (!chosenFile) { showError("classify-error", "choose or drop an image first"); return; }
  const asked = { file: chosenFile, url: $("preview").src, labels: $("labels").value, templates: $("templates").value };
  const form = new FormData();
  form.append("image", asked.file, asked.file.name);
  form.append("labels", asked.labels);
  form.append("templates", asked.templates);
  Heat.clear();
  const button = $("classify-btn");
  button.disabled = true;
  try {
    const result = await api("/api/classify", { method: "POST", body: form });
    renderBars(result.labels);
    Heat.reset(asked.file, asked.url, asked.labels, result.templates);
    $("classify-time").textContent = `${result.image.width}×${result.image.height} px, ` +
      `templates “${result.templates}”, ${result.elapsed_ms} ms`;
  } catch (e) {
    $("results").replaceChildren();
    showError("classify-error", e.message);
  } finally {
    button.disabled = false;
  }
}

// -- search -------------------------------------------------------------------------------------
function renderHits(hits) {
  $("grid").replaceChildren(...hits.map((hit) => {
    const card = el("button", "hit");
    card.type = "button";
    card.dataset.id = String(hit.id);
    card.dataset.rank = String(hit.rank);
    card.title = `${hit.key}: search by this image`;
    const img = el("img");
    img.src = `/api/image/${encodeURIComponent(hit.id)}`;
    img.alt = hit.key;
    img.loading = "lazy";
    const meta = el("span", "meta");
    const key = el("span", "key", hit.key);
    key.title = hit.key;
    meta.append(key, el("span", "score", hit.score.toFixed(3)));
    card.append(img, meta);
    card.addEventListener("click", () => search({ image_id: hit.id }, `image→image: images like ${hit.key}`));
    return card;
  }));
}

async function search(params, caption) {
  showError("search-error", "");
  const query = new URLSearchParams({ ...params, k: $("k").value || "12" });
  const button = $("search-btn");
  button.disabled = true;
  try {
    const result = await api(`/api/search?${query}`);
    $("search-caption").textContent = `${caption}: top ${result.hits.length}`;
    renderHits(result.hits);
  } catch (e) {
    $("grid").replaceChildren();
    $("search-caption").textContent = "";
    showError("search-error", e.message);
  } finally {
    button.disabled = false;
  }
}

function setupDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  });
}

setupDrop();
$("classify-form").addEventListener("submit", classify);
$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) { showError("search-error", "type a query first"); return; }
  search({ q }, `text→image: “${q}”`);
});
init();
