// The smse page: queue images, POST them to /api/predict, draw classes, neighbours and the reference map.
"use strict";

const PALETTE = ["#2a9d8f", "#d1495b", "#3d5a80", "#edae49", "#7b4b94", "#00798c", "#8d6346", "#66a182"];
// distinct hues (Okabe & Ito's colour-blind-safe set), not shades of one blue
const MAG_COLOURS = {40: "#e69f00", 100: "#56b4e9", 200: "#009e73", 400: "#cc79a7", 0: "#999999"};
const MAGS = [40, 100, 200, 400];

const state = {health: null, map: null, queue: [], result: null, token: sessionStorage.getItem("smse-token") || "",
               thumbs: new Map(), colourBy: "class", seq: 0};
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || ["circle", "text", "g", "line", "rect", "path"].includes(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "style") Object.assign(node.style, value);  // CSSOM, which the page's CSP allows
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) if (child !== null && child !== undefined) node.append(child);
  return node;
}

const pct = (p) => `${(100 * p).toFixed(p >= 0.995 || p < 0.005 ? 0 : 1)}%`;
const magName = (m) => (m ? `${m}X` : "unknown");
const classColour = (name) => PALETTE[Math.max(0, state.health.model.classes.indexOf(name)) % PALETTE.length];

function setStatus(text, kind = "") {
  const node = $("status");
  node.textContent = text;
  node.className = `status ${kind}`;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const response = await fetch(path, Object.assign({}, options, {headers}));
  if (response.status === 401) {
    $("token-box").hidden = false;
    throw new Error("this server needs its access token");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// ---------- start-up: model, reference set, map ----------

async function start() {
  const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
  if (hashToken) {
    state.token = hashToken;
    sessionStorage.setItem("smse-token", hashToken);
    history.replaceState(null, "", location.pathname);
  }
  try {
    state.health = await (await api("/api/health")).json();
  } catch (error) {
    setStatus(error.message, "error");
    $("model-info").textContent = "not connected";
    document.body.dataset.state = "error";
    return;
  }
  $("token-box").hidden = true;
  const h = state.health;
  $("model-info").textContent = `${h.model.backbone} · ${h.model.classes.join(" / ")} · ` +
    `${h.reference.size.toLocaleString()} reference images · smse ${h.version}`;
  $("limits-hint").textContent = `PNG, JPEG, TIFF or BMP, any magnification; up to ${h.limits.max_files} images of ` +
    `${Math.round(h.limits.max_file_bytes / 2 ** 20)} MiB. BreakHis-style names give the magnification.`;
  $("footer").textContent = `References: ${h.reference.source}. Distances are squared L2 in the embedding; ` +
    `the map is a ${h.map.method} of the reference embeddings with the queries projected onto it.`;
  state.map = await (await api("/api/reference/map")).json();
  $("map-method").textContent = `${state.map.method}, ${state.map.x.length.toLocaleString()} images`;
  drawMap();
  document.body.dataset.state = "ready";
}

// ---------- the queue ----------

function addFiles(files) {
  const limit = state.health ? state.health.limits : null;
  for (const file of files) {
    if (limit && state.queue.length >= limit.max_files) {
      setStatus(`at most ${limit.max_files} images per case; ${file.name} and later files were left out`, "error");
      break;
    }
    state.queue.push({file, url: URL.createObjectURL(file), magnification: "auto"});
  }
  renderQueue();
  if (state.queue.length) analyse();
}

function renderQueue() {
  const options = [...new Set([...MAGS, ...Object.keys(state.health ? state.health.reference.magnifications : {})
    .map(Number).filter((m) => m > 0)])].sort((a, b) => a - b);
  $("queue").replaceChildren(...state.queue.map((item, i) => el("li", {},
    el("img", {src: item.url, alt: ""}),
    el("span", {class: "name", title: item.file.name, text: `${i + 1}. ${item.file.name}`}),
    el("select", {"aria-label": `magnification of ${item.file.name}`, onchange: (e) => {
      item.magnification = e.target.value;
      analyse();
    }}, el("option", {value: "auto", text: "auto", selected: item.magnification === "auto"}),
    options.map((m) => el("option", {value: String(m), text: `${m}X`, selected: item.magnification === String(m)}))),
    el("button", {class: "remove", type: "button", title: "remove", "aria-label": `remove ${item.file.name}`,
                  text: "×", onclick: () => {
      URL.revokeObjectURL(item.url);
      state.queue.splice(i, 1);
      renderQueue();
      if (state.queue.length) analyse(); else clearResults();
    }}))));
  $("analyse").disabled = $("clear").disabled = !state.queue.length;
}

function clearResults() {
  state.result = null;
  $("results").replaceChildren();
  $("case-body").replaceChildren("The mean over all images of the case appears here.");
  $("case-body").className = "placeholder";
  drawMap();
  setStatus("");
}

// ---------- prediction ----------

async function analyse() {
  if (!state.queue.length || !state.health) return;
  const form = new FormData();
  for (const item of state.queue) {
    form.append("images", item.file, item.file.name);
    form.append("magnification", item.magnification);
  }
  form.append("k", $("k").value);
  document.body.dataset.state = "busy";
  setStatus(`analysing ${state.queue.length} image${state.queue.length > 1 ? "s" : ""} ...`);
  const started = performance.now();
  const seq = ++state.seq;  // a later request supersedes this one
  let result;
  try {
    result = await (await api("/api/predict", {method: "POST", body: form})).json();
  } catch (error) {
    if (seq !== state.seq) return;
    setStatus(error.message, "error");
    document.body.dataset.state = "error";
    return;
  }
  if (seq !== state.seq) return;
  state.result = result;
  const failed = state.result.images.filter((r) => r.error).length;
  setStatus(`${state.result.case.images} image${state.result.case.images > 1 ? "s" : ""} analysed in ` +
    `${Math.round(performance.now() - started)} ms` + (failed ? `; ${failed} unreadable` : ""), failed ? "warn" : "ok");
  renderCase(state.result);
  drawMap();
  await renderResults(state.result);
  document.body.dataset.state = "done";
}

function bars(probabilities, predicted) {
  return el("div", {class: "bars"}, Object.entries(probabilities).map(([name, p]) => el("div", {class: "bar-row"},
    el("span", {class: "bar-name", text: name}),
    el("span", {class: "track"}, el("span", {class: "fill", style: {width: `${(100 * p).toFixed(1)}%`, background: classColour(name)}})),
    el("span", {class: `bar-value${name === predicted ? " best" : ""}`, text: pct(p)}))));
}

function renderCase(result) {
  const c = result.case;
  const votes = Object.values(c.neighbour_vote).reduce((a, b) => a + b, 0);
  $("case-body").className = "case";
  $("case-body").replaceChildren(
    el("div", {class: "verdict"},
      el("span", {class: "chip big", style: {background: classColour(c.predicted)}, text: c.predicted}),
      el("span", {class: "muted", text: `mean over ${c.images} image${c.images > 1 ? "s" : ""}`})),
    bars(c.probabilities, c.predicted),
    el("p", {class: "vote"}, `Nearest-reference vote (${votes} neighbours): `,
      Object.entries(c.neighbour_vote).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1])
        .map(([name, n], i) => [i ? ", " : "", el("b", {style: {color: classColour(name)}, text: name}), ` ${n}`])),
    el("table", {class: "images"}, el("tbody", {}, result.images.map((r, i) => el("tr", {},
      el("td", {}, el("a", {href: `#result-${i + 1}`, class: "number", text: String(i + 1)})),
      el("td", {text: r.magnification ? `${r.magnification}X` : "?"}),
      r.error ? el("td", {colspan: 2, class: "error", text: "unreadable"}) : [
        el("td", {}, el("span", {class: "chip", style: {background: classColour(r.predicted)}, text: r.predicted})),
        el("td", {class: "num", text: pct(r.probabilities[r.predicted])})])))));
}

async function thumbURL(id) {
  if (!state.thumbs.has(id)) {
    state.thumbs.set(id, api(`/api/reference/${id}/thumbnail`).then((r) => r.blob()).then((b) => URL.createObjectURL(b)));
  }
  return state.thumbs.get(id);
}

function neighbourFigure(n, queryMag) {
  const img = el("img", {class: "thumb", alt: `reference ${n.id}: ${n.class}, ${magName(n.magnification)}`});
  const loaded = thumbURL(n.id).then((url) => new Promise((resolve) => {
    img.onload = img.onerror = resolve;
    img.src = url;
  })).catch(() => img.classList.add("broken"));
  const cross = queryMag && n.magnification && n.magnification !== queryMag;
  const figure = el("figure", {class: `neighbour${n.in_top_k ? " overall" : ""}`, title: n.file},
    el("div", {class: "frame"}, img, n.in_top_k ? el("span", {class: "rank", text: `#${n.rank_overall}`}) : null),
    el("figcaption", {},
      el("div", {}, el("span", {class: "chip", style: {background: classColour(n.class)}, text: n.class}),
        n.tumor_type && n.tumor_type !== n.class ? el("span", {class: "type", text: n.tumor_type}) : null),
      el("div", {class: "meta"}, el("span", {text: magName(n.magnification)}), cross ? el("span", {class: "cross", text: "other mag."}) : null),
      el("div", {class: "meta"}, el("span", {text: `patient ${n.patient}`})),
      el("div", {class: "meta"}, el("span", {class: "distance", text: `d = ${n.distance.toPrecision(3)}`}))));
  return {figure, loaded};
}

// how to read a distance: quartiles of reference pairs (different patients), from /api/health
function distanceGuide() {
  const g = state.health && state.health.distance_guide;
  if (!g) return null;
  const median = (part) => (part.quantiles.length ? part.quantiles[2].toPrecision(2) : "-");
  return el("p", {class: "guide muted"}, "Reading d (median between references of other patients): same type " +
    `${median(g.same_type)}, same class ${median(g.same_class)}, other class ${median(g.other_class)}` +
    (g.ood_threshold === null ? "" : `; an image whose 5th nearest lies beyond ${g.ood_threshold.toPrecision(3)} ` +
     "is out of distribution") + ".");
}

async function renderResults(result) {
  const pending = [];
  const cards = result.images.map((r, i) => {
    const item = state.queue[i];
    const head = el("div", {class: "query"},
      el("div", {class: "query-image"}, el("img", {src: item ? item.url : "", alt: r.name}),
        el("span", {class: "marker", text: String(i + 1)})),
      el("div", {class: "query-text"},
        el("h3", {title: r.name, text: r.name}),
        el("p", {class: "muted", text: r.magnification ? `${r.magnification}X` +
          (r.magnification_source === "name" ? " (from the file name)" : " (given)") : "magnification unknown"}),
        r.error ? null : [
          el("div", {class: "verdict"}, el("span", {class: "chip big", style: {background: classColour(r.predicted)}, text: r.predicted}),
            el("span", {class: "muted", text: pct(r.probabilities[r.predicted])})),
          bars(r.probabilities, r.predicted),
          r.out_of_distribution ? el("p", {class: "ood", role: "note", text: "Out of distribution: this image's " +
            "nearest references are farther than references usually are from each other. Class and neighbours " +
            "are less reliable for this image."}) : null,
          distanceGuide()]));
    if (r.error) {
      return el("article", {class: "result failed", id: `result-${i + 1}`}, head,
        el("div", {}, el("h4", {text: "This image could not be read"}), el("p", {class: "error", text: r.error}),
          el("p", {class: "muted", text: "The other images of the case were analysed without it."})));
    }
    const rankOf = new Map(r.neighbours.map((n) => [n.id, n.rank]));
    const rows = r.by_magnification.map((group) => {
      const figures = group.neighbours.map((n) => {
        const f = neighbourFigure(Object.assign({rank_overall: rankOf.get(n.id)}, n), r.magnification);
        pending.push(f.loaded);
        return f.figure;
      });
      return el("div", {class: `mag-row${group.magnification === r.magnification ? " same" : ""}`},
        el("div", {class: "mag-label"}, el("b", {text: magName(group.magnification)}),
          el("small", {text: group.magnification === r.magnification ? "same as query" : ""})),
        el("div", {class: "thumbs", style: {gridTemplateColumns: `repeat(${result.k}, minmax(0, 170px))`}}, figures));
    });
    return el("article", {class: "result", id: `result-${i + 1}`}, head,
      el("div", {class: "neighbours"},
        el("h4", {}, `Nearest reference images per magnification `,
          el("span", {class: "muted", text: `(#n: rank among the ${result.k} nearest overall)`})), rows));
  });
  $("results").replaceChildren(...cards);
  await Promise.all(pending);
}

// ---------- the map ----------

function drawMap() {
  const svg = $("map");
  if (!state.map) return;
  const W = 460, H = 300, pad = 14;
  const m = state.map;
  const queries = state.result ? state.result.images.map((r, i) => [r, i]).filter(([r]) => r.map) : [];
  const xs = m.x.concat(queries.map(([r]) => r.map[0])), ys = m.y.concat(queries.map(([r]) => r.map[1]));
  const range = (v) => v.reduce(([lo, hi], a) => [Math.min(lo, a), Math.max(hi, a)], [Infinity, -Infinity]);
  const [x0, x1] = range(xs), [y0, y1] = range(ys);
  const sx = (x) => pad + (W - 2 * pad) * (x - x0) / ((x1 - x0) || 1);
  const sy = (y) => H - pad - (H - 2 * pad) * (y - y0) / ((y1 - y0) || 1);
  const colour = state.colourBy === "class" ? (i) => classColour(m.classes[i]) : (i) => MAG_COLOURS[m.magnifications[i]] || "#999";
  const dots = m.x.map((x, i) => el("circle", {cx: sx(x).toFixed(1), cy: sy(m.y[i]).toFixed(1), r: 2.6, fill: colour(i)}));
  // markers of images that land on the same spot are fanned out around it, so that none hides another
  const placed = [];
  const spot = (x, y) => {
    let [px, py] = [x, y];
    for (let n = 1; placed.some(([qx, qy]) => Math.hypot(qx - px, qy - py) < 16) && n < 40; n++) {
      const angle = n * 2.39996, radius = 9 + 3 * Math.sqrt(n);
      [px, py] = [x + radius * Math.cos(angle), y + radius * Math.sin(angle)];
    }
    placed.push([px, py]);
    return `translate(${px.toFixed(1)},${py.toFixed(1)})`;
  };
  const marks = queries.map(([r, i]) => el("g", {class: "query-mark", transform: spot(sx(r.map[0]), sy(r.map[1])),
      onclick: () => $(`result-${i + 1}`).scrollIntoView({behavior: "smooth"})},
    el("circle", {r: 9, fill: "#111", stroke: "#fff", "stroke-width": 2}),
    el("text", {y: 4, "text-anchor": "middle", text: String(i + 1)})));
  const ev = m.explained_variance.map((v) => `${(100 * v).toFixed(0)}%`);
  svg.replaceChildren(el("rect", {x: 0, y: 0, width: W, height: H, class: "map-bg"}),
    el("g", {class: "dots"}, dots), el("g", {}, marks),
    el("text", {x: W - pad, y: H - 3, "text-anchor": "end", class: "axis", text: `PC1 (${ev[0]})`}),
    el("text", {x: 4, y: 11, class: "axis", text: `PC2 (${ev[1]})`}));
  const keys = state.colourBy === "class" ? state.health.model.classes.map((c) => [c, classColour(c)])
    : [...new Set(m.magnifications)].sort((a, b) => (a || 1e9) - (b || 1e9)).map((g) => [magName(g), MAG_COLOURS[g] || "#999"]);
  // (replaceChildren is the DOM's own: a null argument would be written out as the text "null")
  $("map-legend").replaceChildren(...keys.map(([name, c]) => el("span", {}, el("i", {style: {background: c}}), name)),
    ...(queries.length ? [el("span", {}, el("i", {class: "q"}), "your images")] : []));
}

// ---------- wiring ----------

function wire() {
  const drop = $("drop");
  $("file-input").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    document.addEventListener(name, (e) => { e.preventDefault(); if (name === "drop" || e.target === drop) drop.classList.remove("over"); });
  }
  document.addEventListener("drop", (e) => addFiles([...e.dataTransfer.files]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file-input").click(); });
  $("analyse").addEventListener("click", analyse);
  $("clear").addEventListener("click", () => {
    state.queue.forEach((item) => URL.revokeObjectURL(item.url));
    state.queue = [];
    renderQueue();
    clearResults();
  });
  $("k").addEventListener("change", analyse);
  $("token-box").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("smse-token", state.token);
    start();
  });
  for (const radio of document.querySelectorAll("input[name=colour]")) {
    radio.addEventListener("change", (e) => { state.colourBy = e.target.value; drawMap(); });
  }
}

wire();
start();
