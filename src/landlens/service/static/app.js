// landlens search page: upload a query image (or click a result) and show the most similar
// archive images. Plain JS, no build step. Every string from the server goes through
// textContent (never innerHTML), so file and class names cannot inject markup.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const els = {
    drop: $("drop-zone"),
    file: $("file-input"),
    k: $("k"),
    filter: $("class-filter"),
    status: $("status"),
    results: $("results"),
    figure: $("query-figure"),
    preview: $("query-preview"),
    caption: $("query-caption"),
    probs: $("probs"),
    probList: $("prob-list"),
    info: $("archive-info"),
  };

  const state = {
    classifier: false, // from /api/health
    last: null, // the last query: {file: File} or {id: number, thumbnail: string, name: string}
    objectUrl: null, // object URL of the uploaded query (revoked when replaced)
    seq: 0, // request counter: only the newest response is shown
  };

  // ------------------------------------------------------------------ helpers

  function setStatus(text, isError) {
    els.status.textContent = text;
    els.status.classList.toggle("error", Boolean(isError));
  }

  // One readable line from an error response: {"detail": "..."} or FastAPI's list form.
  async function errorDetail(response) {
    try {
      const body = await response.json();
      const detail = body && body.detail;
      if (typeof detail === "string") return detail;
      if (Array.isArray(detail)) {
        return detail.map((d) => (d && d.msg) || String(d)).join("; ");
      }
    } catch (_) {
      // not JSON: fall through
    }
    return `request failed: HTTP ${response.status} ${response.statusText}`.trim();
  }

  async function getJson(url, options) {
    const response = await fetch(url, options);
    if (!response.ok) throw new Error(await errorDetail(response));
    return response.json();
  }

  // Only same-origin URLs from the server are used as image sources.
  function sameOrigin(url) {
    try {
      const u = new URL(url, window.location.href);
      return u.origin === window.location.origin ? u.href : null;
    } catch (_) {
      return null;
    }
  }

  function kValue() {
    const k = Number.parseInt(els.k.value, 10);
    const max = Number.parseInt(els.k.max, 10) || 100;
    return Number.isFinite(k) ? Math.min(Math.max(k, 1), max) : 12;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ------------------------------------------------------------------ rendering

  function showQuery(src, caption) {
    els.preview.hidden = false;
    els.preview.src = src;
    els.caption.textContent = caption;
    els.figure.hidden = false;
  }

  // Browsers cannot show some query formats (TIFF): keep the name, drop the broken image.
  els.preview.addEventListener("error", () => {
    els.preview.hidden = true;
    els.caption.textContent += " (no preview: the browser cannot show this format)";
  });

  function renderResults(data) {
    const cards = (data.results || []).map((hit) => {
      const card = el("button", "result");
      card.type = "button";
      card.dataset.id = String(hit.id);
      const cls = hit.class == null ? "unlabelled" : String(hit.class);
      const score = Number(hit.score).toFixed(3);
      card.setAttribute(
        "aria-label",
        `Rank ${hit.rank}: ${hit.name} (${cls}), score ${score}. Search with this image.`
      );
      card.title = String(hit.name);

      const img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = "";
      img.width = 256;
      img.height = 256;
      const src = sameOrigin(hit.thumbnail);
      if (src) img.src = src;

      const meta = el("span", "meta");
      meta.append(el("span", "rank", String(hit.rank)), el("span", "class", cls),
        el("span", "score", score));
      card.append(img, meta);
      card.addEventListener("click", () =>
        searchById(hit.id, src, String(hit.name), cls));
      return card;
    });
    els.results.replaceChildren(...cards);
  }

  function renderProbs(classification) {
    const predictions = classification && classification.predictions;
    if (!state.classifier || !Array.isArray(predictions)) {
      els.probs.hidden = true;
      els.probList.replaceChildren();
      return;
    }
    const rows = predictions.map((p) => {
      const prob = Math.min(Math.max(Number(p.probability) || 0, 0), 1);
      const row = el("li", "prob");
      const bar = el("span", "bar");
      const fill = el("span", "fill");
      fill.style.width = `${(prob * 100).toFixed(2)}%`;
      bar.append(fill);
      row.append(el("span", "name", String(p.class)), bar,
        el("span", "value", `${(prob * 100).toFixed(1)}%`));
      return row;
    });
    els.probList.replaceChildren(...rows);
    els.probs.hidden = false;
  }

  // ------------------------------------------------------------------ searching

  async function run(request) {
    const seq = ++state.seq;
    setStatus("Searching…");
    els.results.setAttribute("aria-busy", "true");
    try {
      const data = await request();
      if (seq !== state.seq) return; // a newer search is on its way
      renderResults(data);
      renderProbs(data.classification);
      const n = (data.results || []).length;
      const ms = Math.round(Number(data.timing_ms && data.timing_ms.total) || 0);
      setStatus(`${n} result${n === 1 ? "" : "s"} in ${ms} ms`);
    } catch (err) {
      if (seq !== state.seq) return;
      els.results.replaceChildren();
      renderProbs(null);
      setStatus(err && err.message ? err.message : String(err), true);
    } finally {
      if (seq === state.seq) els.results.removeAttribute("aria-busy");
    }
  }

  function searchByFile(file) {
    state.last = { file };
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(file);
    showQuery(state.objectUrl, file.name);
    return run(() => {
      const form = new FormData();
      form.append("file", file, file.name);
      form.append("k", String(kValue()));
      if (els.filter.value) form.append("class", els.filter.value);
      return getJson("api/search", { method: "POST", body: form });
    });
  }

  function searchById(id, thumbnail, name, cls) {
    state.last = { id, thumbnail, name, cls };
    if (thumbnail) showQuery(thumbnail, `${name} (${cls})`);
    return run(() => {
      const params = new URLSearchParams({ k: String(kValue()) });
      if (els.filter.value) params.set("class", els.filter.value);
      return getJson(`api/search/${encodeURIComponent(id)}?${params}`);
    });
  }

  function rerun() {
    const last = state.last;
    if (!last) return;
    if (last.file) searchByFile(last.file);
    else searchById(last.id, last.thumbnail, last.name, last.cls);
  }

  // ------------------------------------------------------------------ start-up

  async function loadArchiveInfo() {
    try {
      const health = await getJson("api/health");
      state.classifier = health.classifier === true;
      els.info.textContent =
        `${health.images} images indexed with ${health.backbone}` +
        (state.classifier ? " · classifier loaded" : "");
    } catch (err) {
      setStatus(`server not reachable: ${err.message}`, true);
    }
    try {
      const data = await getJson("api/classes");
      const options = (data.classes || []).map((c) => {
        const option = el("option", null, `${c.name} (${c.count})`);
        option.value = String(c.name);
        return option;
      });
      els.filter.replaceChildren(els.filter.options[0], ...options);
    } catch (err) {
      setStatus(`could not load classes: ${err.message}`, true);
    }
  }

  function pickFile(files) {
    const file = files && files[0];
    if (file) searchByFile(file);
  }

  els.file.addEventListener("change", () => {
    pickFile(els.file.files);
    els.file.value = ""; // choosing the same file again still fires "change"
  });
  els.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    els.drop.classList.add("dragging");
  });
  els.drop.addEventListener("dragleave", () => els.drop.classList.remove("dragging"));
  els.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    els.drop.classList.remove("dragging");
    pickFile(event.dataTransfer && event.dataTransfer.files);
  });
  // A file dropped outside the drop zone must not make the browser navigate away.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  els.filter.addEventListener("change", rerun);
  els.k.addEventListener("change", rerun);

  loadArchiveInfo();
})();
