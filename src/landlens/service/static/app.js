// landlens search page: upload a query image (or click a result) and show the most similar
// archive images. Plain JS, no build step. Every string from the server goes through
// textContent (never innerHTML), so file and class names cannot inject markup.
//
// Relevance feedback: each result card has two toggles (✓ relevant, ✕ not relevant). "Refine"
// posts the query (an indexed id, or the query_token of an upload) with every mark made since
// the query was chosen to /api/search/feedback (Rocchio on the embeddings) and redraws the
// grid; marks are kept by id, so a marked image that reappears keeps its state. A new query
// (upload or a click on a card) clears the marks.
//
// Search by words (when /api/health says "text"): the sentence of the text box, alone or with
// the last query image ("with the last query image"), goes to /api/search/text; its results
// take feedback marks the same way (the sentence and the marks are sent again on each round).
//
// Archives of scenes (/api/scenes not empty): the scene view shows a scene's overview with the
// query's window (red) and the hits' windows (yellow) drawn on it in the scene's chip-grid
// pixels (an SVG whose viewBox is the grid); a click searches at that place (/api/search/at
// with scene, col, row), whose query token takes feedback like an upload's.
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
    feedbackBar: $("feedback-bar"),
    refine: $("refine"),
    clearMarks: $("clear-marks"),
    marksSummary: $("marks-summary"),
    textForm: $("text-form"),
    textQuery: $("text-query"),
    textCombine: $("text-combine"),
    sceneView: $("scene-view"),
    sceneSelect: $("scene-select"),
    sceneImage: $("scene-image"),
    sceneOverlay: $("scene-overlay"),
  };

  const MARK_TEXT = { relevant: "✓", irrelevant: "✕" };
  const MARK_LABEL = { relevant: "Relevant", irrelevant: "Not relevant" };

  const state = {
    classifier: false, // from /api/health
    last: null, // the last query: {file: File, token}, {id, thumbnail, name} or {text, image}
    image: null, // the last image query, for text + image: {id} or {file, token}
    objectUrl: null, // object URL of the uploaded query (revoked when replaced)
    seq: 0, // request counter: only the newest response is shown
    marks: new Map(), // id -> "relevant" | "irrelevant", for the current query
    round: 0, // feedback rounds shown for the current query (0: the plain search)
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

  // A toggle button marking one result relevant or not relevant (aria-pressed).
  function markButton(id, kind, name) {
    const button = el("button", `mark mark-${kind}`, MARK_TEXT[kind]);
    button.type = "button";
    button.dataset.mark = kind;
    button.title = MARK_LABEL[kind];
    button.setAttribute("aria-label", `${MARK_LABEL[kind]}: ${name}`);
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", (event) => {
      event.stopPropagation(); // a mark never searches with the card's image
      toggleMark(id, kind);
    });
    return button;
  }

  function renderResults(data) {
    const cards = (data.results || []).map((hit) => {
      const item = el("div", "card");
      item.dataset.id = String(hit.id);
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

      const feedback = el("div", "feedback");
      feedback.setAttribute("role", "group");
      feedback.setAttribute("aria-label", `Feedback on ${hit.name}`);
      feedback.append(markButton(hit.id, "relevant", String(hit.name)),
        markButton(hit.id, "irrelevant", String(hit.name)));
      item.append(card, feedback);
      return item;
    });
    els.results.replaceChildren(...cards);
    showMarks();
  }

  // ------------------------------------------------------------------ relevance feedback

  function canRefine() {
    const q = state.last;
    return Boolean(q && state.marks.size > 0 && (q.id != null || q.token || q.text));
  }

  // Reflect state.marks on the cards, the buttons and the summary line.
  function showMarks() {
    for (const item of els.results.querySelectorAll(".card")) {
      const mark = state.marks.get(Number(item.dataset.id));
      item.classList.toggle("is-relevant", mark === "relevant");
      item.classList.toggle("is-irrelevant", mark === "irrelevant");
      for (const button of item.querySelectorAll(".mark")) {
        button.setAttribute("aria-pressed", String(button.dataset.mark === mark));
      }
    }
    let relevant = 0;
    for (const kind of state.marks.values()) if (kind === "relevant") relevant += 1;
    const irrelevant = state.marks.size - relevant;
    const hasResults = els.results.childElementCount > 0 || state.round > 0;
    els.feedbackBar.hidden = !(hasResults && state.last);
    els.refine.disabled = !canRefine();
    els.clearMarks.disabled = state.marks.size === 0;
    if (state.marks.size === 0) {
      els.marksSummary.textContent = "Mark results ✓ relevant or ✕ not relevant, then refine.";
    } else if (state.last && state.last.id == null && !state.last.token && !state.last.text) {
      els.marksSummary.textContent = "This server keeps no upload queries: feedback needs a search by an archive image.";
    } else {
      els.marksSummary.textContent = `${relevant} relevant, ${irrelevant} not relevant marked.`;
    }
  }

  function toggleMark(id, kind) {
    if (state.marks.get(id) === kind) state.marks.delete(id);
    else state.marks.set(id, kind);
    showMarks();
  }

  function resetFeedback() {
    state.marks.clear();
    state.round = 0;
    showMarks();
  }

  function feedbackBody() {
    const q = state.last;
    if (q.text) return textBody(q);
    const body = {
      query: q.id != null ? { id: q.id } : { vector_token: q.token },
      relevant: [],
      irrelevant: [],
      k: kValue(),
    };
    for (const [id, kind] of state.marks) body[kind].push(id);
    if (els.filter.value) body.class = els.filter.value;
    return body;
  }

  function postFeedback(body) {
    return fetch("api/search/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  // Refine the current query with every mark; round: the round number to show (default: next).
  function refine(round) {
    if (!canRefine()) return undefined;
    const q = state.last;
    const next = round || state.round + 1;
    if (q.text) return run(() => postText(textBody(q)), next);
    return run(async () => {
      let response = await postFeedback(feedbackBody());
      if (response.status === 410 && q.file) {
        // the server forgot the uploaded query: upload it again for a new token, retry once
        const fresh = await uploadSearch(q.file);
        q.token = fresh.query_token;
        if (!q.token) throw new Error(await errorDetail(response));
        response = await postFeedback(feedbackBody());
      }
      if (!response.ok) throw new Error(await errorDetail(response));
      return response.json();
    }, next);
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

  // Run a search request and show its answer; round: the feedback round it is (0: none).
  async function run(request, round) {
    const seq = ++state.seq;
    const last = state.last;
    setStatus(round ? `Refining (round ${round})…` : "Searching…");
    els.results.setAttribute("aria-busy", "true");
    try {
      const data = await request();
      if (seq !== state.seq) return; // a newer search is on its way
      if (last && (last.file || last.scene != null) && data.query_token) last.token = data.query_token;
      state.round = round || 0;
      renderResults(data);
      showPlaces(data);
      if (!round) renderProbs(data.classification); // a refinement keeps the query's predictions
      const n = (data.results || []).length;
      const ms = Math.round(Number(data.timing_ms && data.timing_ms.total) || 0);
      const text = `${n} result${n === 1 ? "" : "s"} in ${ms} ms`;
      setStatus(round ? `round ${round}: ${text}` : text);
    } catch (err) {
      if (seq !== state.seq) return;
      els.results.replaceChildren();
      if (!round) renderProbs(null);
      showMarks();
      setStatus(err && err.message ? err.message : String(err), true);
    } finally {
      if (seq === state.seq) els.results.removeAttribute("aria-busy");
    }
  }

  function uploadSearch(file) {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("k", String(kValue()));
    if (els.filter.value) form.append("class", els.filter.value);
    return getJson("api/search", { method: "POST", body: form });
  }

  // The body of a text search: the sentence, the image it is combined with, the marks.
  function textBody(q) {
    const body = { text: q.text, k: kValue(), relevant: [], irrelevant: [] };
    if (q.image) {
      body.image = q.image.id != null ? { id: q.image.id } : { vector_token: q.image.token };
    }
    for (const [id, kind] of state.marks) body[kind].push(id);
    if (els.filter.value) body.class = els.filter.value;
    return body;
  }

  function postText(body) {
    return getJson("api/search/text", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  function searchByText(text) {
    const image = els.textCombine.checked ? state.image : null;
    if (image && image.id == null && !image.token) {
      setStatus("The last query image is no longer known to the server: search with it again first.", true);
      return undefined;
    }
    state.last = { text, image };
    resetFeedback();
    if (!image) {
      els.figure.hidden = true;
      renderProbs(null);
    }
    return run(() => postText(textBody(state.last)), 0);
  }

  function rememberImage(query) {
    state.image = query;
    els.textCombine.disabled = false;
  }

  function searchByFile(file) {
    state.last = { file, token: null };
    rememberImage(state.last);
    resetFeedback();
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(file);
    showQuery(state.objectUrl, file.name);
    return run(() => uploadSearch(file), 0);
  }

  function searchById(id, thumbnail, name, cls) {
    state.last = { id, thumbnail, name, cls };
    rememberImage(state.last);
    resetFeedback();
    if (thumbnail) showQuery(thumbnail, `${name} (${cls})`);
    return run(() => {
      const params = new URLSearchParams({ k: String(kValue()) });
      if (els.filter.value) params.set("class", els.filter.value);
      return getJson(`api/search/${encodeURIComponent(id)}?${params}`);
    }, 0);
  }

  // k or the class filter changed: run the current query again, refined if it was.
  function rerun() {
    const last = state.last;
    if (!last) return;
    if (state.round > 0 && canRefine()) {
      refine(state.round);
      return;
    }
    if (last.text) {
      run(() => postText(textBody(last)), 0);
    } else if (last.scene != null) {
      run(() => getJson(`api/search/at?${atParams(last)}`), 0);
    } else if (last.file) {
      run(() => uploadSearch(last.file), 0);
    } else {
      run(() => {
        const params = new URLSearchParams({ k: String(kValue()) });
        if (els.filter.value) params.set("class", els.filter.value);
        return getJson(`api/search/${encodeURIComponent(last.id)}?${params}`);
      }, 0);
    }
  }

  // ------------------------------------------------------------------ scenes

  const SVG_NS = "http://www.w3.org/2000/svg";
  const scenes = { list: [], current: -1, places: [] };

  // Draw the query's and the hits' windows that lie on the scene shown.
  function drawPlaces() {
    const sc = scenes.list[scenes.current];
    if (!sc) {
      els.sceneOverlay.replaceChildren();
      return;
    }
    els.sceneOverlay.setAttribute("viewBox", `0 0 ${sc.width} ${sc.height}`);
    const shapes = [];
    for (const p of scenes.places) {
      if (p.place.scene !== sc.index) continue;
      const [x, y, w, h] = p.place.window.map(Number);
      const rect = document.createElementNS(SVG_NS, "rect");
      rect.setAttribute("x", String(x));
      rect.setAttribute("y", String(y));
      rect.setAttribute("width", String(w));
      rect.setAttribute("height", String(h));
      rect.setAttribute("class", p.kind);
      const title = document.createElementNS(SVG_NS, "title");
      title.textContent = p.label;
      rect.append(title);
      shapes.push(rect);
    }
    els.sceneOverlay.replaceChildren(...shapes);
  }

  function selectScene(index) {
    const sc = scenes.list[index];
    if (!sc) return;
    scenes.current = index;
    els.sceneSelect.value = String(index);
    const src = sameOrigin(sc.overview);
    if (src) els.sceneImage.src = src;
    els.sceneImage.alt = `Overview of ${sc.name}`;
    drawPlaces();
  }

  // The places of a search answer; the view follows the query's scene, else the best hit's.
  function showPlaces(data) {
    if (!scenes.list.length) return;
    const query = data.query && data.query.place;
    scenes.places = [];
    for (const hit of data.results || []) {
      if (hit.place) scenes.places.push({ place: hit.place, kind: "hit", label: `${hit.rank}: ${hit.name}` });
    }
    if (query) scenes.places.push({ place: query, kind: "query", label: "query" }); // drawn last, on top
    const first = query ? scenes.places[scenes.places.length - 1] : scenes.places[0];
    if (first && first.place.scene !== scenes.current) selectScene(first.place.scene);
    else drawPlaces();
  }

  function atParams(q) {
    const params = new URLSearchParams({
      scene: String(q.scene), col: q.col.toFixed(1), row: q.row.toFixed(1), k: String(kValue()),
    });
    if (els.filter.value) params.set("class", els.filter.value);
    return params;
  }

  function searchAt(col, row) {
    const sc = scenes.list[scenes.current];
    state.last = { scene: sc.index, col, row, token: null };
    rememberImage(state.last);
    resetFeedback();
    els.figure.hidden = true;
    renderProbs(null);
    return run(() => getJson(`api/search/at?${atParams(state.last)}`), 0);
  }

  async function loadScenes() {
    try {
      const data = await getJson("api/scenes");
      scenes.list = data.scenes || [];
    } catch (err) {
      return; // an older server: no scene view
    }
    if (!scenes.list.length) return;
    const options = scenes.list.map((sc) => {
      const option = el("option", null, `${sc.name} (${sc.chips} chips)`);
      option.value = String(sc.index);
      return option;
    });
    els.sceneSelect.replaceChildren(...options);
    els.sceneView.hidden = false;
    selectScene(0);
  }

  els.sceneSelect.addEventListener("change", () => selectScene(Number(els.sceneSelect.value)));
  els.sceneImage.addEventListener("click", (event) => {
    const sc = scenes.list[scenes.current];
    const box = els.sceneImage.getBoundingClientRect();
    if (!sc || !box.width || !box.height) return;
    const col = Math.min(Math.max(((event.clientX - box.left) / box.width) * sc.width, 0), sc.width);
    const row = Math.min(Math.max(((event.clientY - box.top) / box.height) * sc.height, 0), sc.height);
    searchAt(col, row);
  });

  // ------------------------------------------------------------------ start-up

  async function loadArchiveInfo() {
    try {
      const health = await getJson("api/health");
      state.classifier = health.classifier === true;
      els.info.textContent =
        `${health.images} images indexed with ${health.backbone}` +
        (state.classifier ? " · classifier loaded" : "") +
        (health.text === true ? " · search by words" : "");
      els.textForm.hidden = health.text !== true;
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
  els.textForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.textQuery.value.trim();
    if (text) searchByText(text);
    else setStatus("Type a few words to search by, e.g. “harbor with many boats”.", true);
  });
  els.filter.addEventListener("change", rerun);
  els.k.addEventListener("change", rerun);
  els.refine.addEventListener("click", () => refine());
  els.clearMarks.addEventListener("click", () => {
    state.marks.clear();
    showMarks();
  });

  loadArchiveInfo();
  loadScenes();
})();
