// littune web app: where in the classified image a label (or a typed text) matches. POST /api/heatmap
// answers a small map of cosines per label (4 x 4 to 16 x 16 cells) and where it lies in the image; it is
// drawn on a canvas over the image in a colour map with transparency. Loaded before app.js, whose
// api() and showError() it calls; app.js calls Heat.clear() and Heat.reset(). Plain DOM, no build step.
"use strict";

const Heat = (() => {
  const byId = (id) => document.getElementById(id);
  // viridis at five stops: dark blue-purple (weakest match) to yellow (strongest)
  const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  let source = null;   // what was classified: {file, labels, templates}
  let labelMaps = null; // the promise of the maps of all its labels (one request serves every click)
  let shown = null;    // what the overlay shows: {result, index, title}
  let ticket = 0;      // only the latest click draws

  function colour(t) {
    const x = Math.min(Math.max(t, 0), 1) * (STOPS.length - 1);
    const i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
    return STOPS[i].map((v, k) => Math.round(v + f * (STOPS[i + 1][k] - v)));
  }
  const alpha = (t) => Math.round(255 * (0.2 + 0.65 * Math.min(Math.max(t, 0), 1)));
  const level = (v, lo, hi) => (hi > lo ? (v - lo) / (hi - lo) : 0.5);

  function request(fields) {
    const form = new FormData();
    form.append("image", source.file, source.file.name);
    form.append("templates", source.templates);
    for (const [k, v] of Object.entries(fields)) form.append(k, v);
    return api("/api/heatmap", { method: "POST", body: form });
  }

  function pressed(label) {
    for (const b of document.querySelectorAll("#results button.label")) {
      b.setAttribute("aria-pressed", String(b.dataset.label === label));
    }
  }

  async function show(load, title, pick, label) {
    const mine = ++ticket;
    showError("where-error", "");
    pressed(label);
    byId("where").setAttribute("aria-busy", "true");
    try {
      const result = await load();
      if (mine !== ticket) return;
      shown = { result, index: pick(result), title };
      byId("heat").hidden = false;
      await byId("heat-image").decode().catch(() => {}); // laid out before it is measured
      if (mine === ticket) paint();
    } catch (e) {
      if (mine !== ticket) return;
      byId("heat").hidden = true;
      shown = null;
      pressed(null);
      showError("where-error", e.message);
    } finally {
      if (mine === ticket) byId("where").removeAttribute("aria-busy");
    }
  }

  // The map interpolated linearly between the cells' centres, SUB pixels a cell (odd: a pixel at each centre
  // keeps the cell's own value), as an image; the browser scales it over the image, whose whole is the box.
  const SUB = 9;
  function cellImage(map, lo, hi) {
    const h = map.length, w = map[0].length, canvas = document.createElement("canvas");
    canvas.width = w * SUB;
    canvas.height = h * SUB;
    const ctx = canvas.getContext("2d"), pixels = ctx.createImageData(canvas.width, canvas.height);
    const at = (i, n) => { const f = Math.min(Math.max((i + 0.5) / SUB - 0.5, 0), n - 1), a = Math.min(Math.floor(f), n - 2);
      return n > 1 ? [a, f - a] : [0, 0]; };
    for (let y = 0; y < canvas.height; y++) {
      const [r, ty] = at(y, h), r1 = Math.min(r + 1, h - 1);
      for (let x = 0; x < canvas.width; x++) {
        const [c, tx] = at(x, w), c1 = Math.min(c + 1, w - 1);
        const v = (1 - ty) * ((1 - tx) * map[r][c] + tx * map[r][c1]) + ty * ((1 - tx) * map[r1][c] + tx * map[r1][c1]);
        const t = level(v, lo, hi);
        pixels.data.set([...colour(t), alpha(t)], 4 * (y * canvas.width + x));
      }
    }
    ctx.putImageData(pixels, 0, 0);
    return canvas;
  }

  function paint() {
    const { result, index, title } = shown;
    const item = result.labels[index], [h, w] = result.shape, [lo, hi] = result.range;
    const img = byId("heat-image"), canvas = byId("heat-overlay"), scale = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(img.clientWidth * scale));
    canvas.height = Math.max(1, Math.round(img.clientHeight * scale));
    const [x0, y0, x1, y1] = result.box, sx = canvas.width / (x1 - x0), sy = canvas.height / (y1 - y0);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(cellImage(item.map, lo, hi), -x0 * sx, -y0 * sy, w * sx, h * sy);
    describe(result, item, title);
    byId("heat").dataset.shown = title;
  }

  function place(v, box, words) { // a cell centre's third of the image, in words
    const f = (v + 0.5 - box[0]) / (box[1] - box[0]);
    return words[f < 1 / 3 ? 0 : f > 2 / 3 ? 2 : 1];
  }

  function describe(result, item, title) {
    const [h, w] = result.shape, [lo, hi] = result.range, [x0, y0, x1, y1] = result.box;
    const flat = item.map.flat(), top = flat.indexOf(Math.max(...flat)), r = Math.floor(top / w), c = top % w;
    const where = `${place(r, [y0, y1], ["top", "middle", "bottom"])} ${place(c, [x0, x1], ["left", "centre", "right"])}`;
    byId("heat-overlay").setAttribute("aria-label", `Heat map of where ${title} matches in the image: ` +
      `strongest at the ${where} (cosine ${flat[top].toFixed(3)})`);
    byId("heat-caption").textContent = `Where ${title} matches` +
      (result.labels.length > 1 ? ` (probability ${(100 * item.probability).toFixed(1)}%)` : "");
    byId("heat-min").textContent = lo.toFixed(3);
    byId("heat-max").textContent = hi.toFixed(3);
    byId("heat-legend").setAttribute("aria-label", `Colour scale: dark purple is cosine ${lo.toFixed(3)} ` +
      `(weakest match), yellow is ${hi.toFixed(3)} (strongest)` + (result.labels.length > 1 ? ", over all labels" : ""));
    byId("heat-note").textContent = `${result.exact ? "Exact" : "Approximate"}: ${h}×${w} cells, ` +
      (result.exact ? "their mean is the embedding the image is classified with. "
        : "the model classifies with another embedding than these cells'. ") + result.how;
  }

  function legend() {
    const canvas = byId("heat-legend"), ctx = canvas.getContext("2d");
    for (let x = 0; x < canvas.width; x++) {
      ctx.fillStyle = `rgb(${colour(x / (canvas.width - 1)).join(",")})`;
      ctx.fillRect(x, 0, 1, canvas.height);
    }
  }

  function clear() {
    ticket++;
    source = labelMaps = shown = null;
    byId("where").hidden = true;
    byId("heat").hidden = true;
    showError("where-error", "");
  }

  function reset(file, url, labels, templates) {
    clear();
    source = { file, labels, templates };
    const img = byId("heat-image");
    img.src = url;
    img.alt = `the classified image, ${file.name}`;
    byId("where").hidden = false;
  }

  function showLabel(label) {
    if (!source) return;
    if (!labelMaps) {
      const maps = labelMaps = request({ labels: source.labels });
      maps.catch(() => { if (labelMaps === maps) labelMaps = null; }); // a failure is asked again next click
    }
    const maps = labelMaps;
    show(() => maps, `“${label}”`, (result) => result.labels.findIndex((x) => x.label === label), label);
  }

  function showQuery(event) {
    event.preventDefault();
    const text = byId("where-query").value.trim();
    if (!source) return;
    if (!text) { showError("where-error", "type a text to find in the image first"); return; }
    show(() => request({ query: text }), `“${text}”`, () => 0, null);
  }

  legend();
  byId("where-form").addEventListener("submit", showQuery);
  byId("heat-opacity").addEventListener("input", (e) => { byId("heat-overlay").style.opacity = e.target.value / 100; });
  window.addEventListener("resize", () => { if (shown && !byId("heat").hidden) paint(); });
  return { clear, reset, showLabel };
})();
