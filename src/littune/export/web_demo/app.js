// littune's static search page: a text query -> the text tower in onnxruntime-web -> cosine against
// the index's image embeddings (precomputed by `littune export --format web`) -> the top-k thumbnails.
// Everything is read from this folder: littune_web.json, embeddings.f16, text.onnx, tokenizer.json,
// thumbs/, and the two libraries under vendor/ (copied from npm at export time).
import * as ort from "./vendor/ort.wasm.bundle.min.mjs";
import { Tokenizer } from "./vendor/tokenizers.min.mjs";

const $ = (id) => document.getElementById(id);

function setStatus(message, error = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", error);
}

async function fetchOk(path) {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r;
}

// IEEE half -> float, one table for all 65536 codes.
const HALF = (() => {
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    t[h] = e === 0 ? sign * f * 2 ** -24 : e === 31 ? (f ? NaN : sign * Infinity) : sign * (1 + f / 1024) * 2 ** (e - 15);
  }
  return t;
})();

function decodeEmbeddings(buffer, meta) {
  const n = meta.count * meta.dim, view = new DataView(buffer), out = new Float32Array(n);
  const width = meta.dtype === "float16" ? 2 : 4;
  if (buffer.byteLength !== n * width) throw new Error(`${meta.embeddings}: ${buffer.byteLength} bytes, expected ${n * width}`);
  for (let i = 0; i < n; i++) out[i] = width === 2 ? HALF[view.getUint16(2 * i, true)] : view.getFloat32(4 * i, true);
  return out;
}

// Token ids as littune's tokenizer gives them: the tokenizer.json's own pipeline (normalizer,
// pre-tokenizer, model, post-processor) in tokenizers.js, then truncation to the context length that
// keeps the special tokens the post-processor adds, as the Python `tokenizers` truncation does.
function tokenizeWith(tokenizer, text) {
  const full = tokenizer.encode(text).ids;
  if (full.length <= STATE.meta.text.context_length) return full;
  const body = tokenizer.encode(text, { add_special_tokens: false }).ids;
  const extra = full.length - body.length;
  let at = 0;
  while (at < extra && !body.every((id, j) => full[at + j] === id)) at++;
  const keep = STATE.meta.text.context_length - extra;
  const cut = STATE.meta.text.truncation_side === "left" ? body.slice(body.length - keep) : body.slice(0, keep);
  return [...full.slice(0, at), ...cut, ...full.slice(at + body.length)];
}

const STATE = { meta: null, tokenizer: null, session: null, embeddings: null };

async function embed(text) {
  const ids = tokenizeWith(STATE.tokenizer, text);
  const shape = [1, ids.length];
  const feeds = {
    input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, (x) => BigInt(x)), shape),
    attention_mask: new ort.Tensor("int64", new BigInt64Array(ids.length).fill(1n), shape),
  };
  const out = await STATE.session.run(feeds);
  return out[STATE.meta.text.output].data;
}

// Cosine = dot product (both sides are L2-normalised); ties go to the lower row, as in littune search.
async function search(text, k) {
  const q = await embed(text), { count, dim } = STATE.meta, e = STATE.embeddings;
  const scores = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    let s = 0;
    for (let j = 0, o = i * dim; j < dim; j++) s += q[j] * e[o + j];
    scores[i] = s;
  }
  const order = Array.from({ length: count }, (_, i) => i);
  order.sort((a, b) => scores[b] - scores[a] || a - b);
  return order.slice(0, Math.min(k, count)).map((i, r) => ({ rank: r + 1, index: i, key: STATE.meta.keys[i], score: scores[i] }));
}

function render(text, hits) {
  const box = $("results");
  box.replaceChildren(...hits.map((h) => {
    const fig = document.createElement("figure");
    fig.className = "hit";
    Object.assign(fig.dataset, { rank: h.rank, index: h.index, key: h.key, score: h.score });
    const thumb = STATE.meta.thumbnails[h.index];
    const pic = document.createElement(thumb ? "img" : "div");
    if (thumb) Object.assign(pic, { src: thumb, alt: h.key, loading: "lazy" });
    else pic.className = "missing";
    const cap = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = h.score.toFixed(3);
    cap.append(score, " ", h.key);
    fig.append(pic, cap);
    return fig;
  }));
  box.dataset.query = text;
}

async function onSearch(event) {
  event.preventDefault();
  const text = $("query").value.trim(), k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 12));
  if (!text) return;
  const t0 = performance.now();
  try {
    const hits = await search(text, k);
    render(text, hits);
    setStatus(`${hits.length} of ${STATE.meta.count} images for "${text}" (${Math.round(performance.now() - t0)} ms)`);
  } catch (e) {
    setStatus(`search failed: ${e.message || e}`, true);
  }
}

async function main() {
  const meta = await (await fetchOk("littune_web.json")).json();
  STATE.meta = meta;
  ort.env.wasm.numThreads = 1; // single-threaded: a plain static server gives no cross-origin isolation
  // the bundle carries its wasm loader; only the .wasm binary is fetched, from vendor/
  ort.env.wasm.wasmPaths = { wasm: new URL("vendor/ort-wasm-simd-threaded.wasm", document.baseURI).href };
  const [tok, model, emb] = await Promise.all([
    fetchOk(meta.text.tokenizer).then((r) => r.json()),
    fetchOk(meta.text.file).then((r) => r.arrayBuffer()),
    fetchOk(meta.embeddings).then((r) => r.arrayBuffer()),
  ]);
  STATE.tokenizer = new Tokenizer(tok, {});
  STATE.embeddings = decodeEmbeddings(emb, meta);
  STATE.session = await ort.InferenceSession.create(new Uint8Array(model), { executionProviders: ["wasm"] });
  window.littune = {  // for scripts and tests: the page's own tokenization, embedding and ranking
    tokenize: (text) => tokenizeWith(STATE.tokenizer, text),
    tokenizeWithJson: (json, text) => tokenizeWith(new Tokenizer(json, {}), text),
    embed: async (text) => Array.from(await embed(text)),
    search,
  };
  $("form").addEventListener("submit", onSearch);
  for (const id of ["query", "go"]) $(id).disabled = false;
  $("query").focus();
  setStatus(`${meta.count} images, ${meta.dim}-d embeddings; type a query`);
  document.body.dataset.ready = "1";
}

main().catch((e) => {
  setStatus(`cannot start: ${e.message || e}`, true);
  document.body.dataset.ready = "error";
});
