// The smse page: queue images, POST them to /api/predict, draw classes, neighbours and the reference map.
"use strict";

const PALETTE = ["#2a9d8f", "#d1495b", "#3d5a80", "#edae49", "#7b4b94", "#00798c", "#8d6346", "#66a182"];
// distinct hues (Okabe & Ito's colour-blind-safe set), not shades of one blue
const MAG_COLOURS = {40: "#e69f00", 100: "#56b4e9", 200: "#009e73", 400: "#cc79a7", 0: "#999999"};
const MAGS = [40, 100, 200, 400];
// the reliability diagram's colours, as the report's (report/plots.py: METHOD_COLOURS[0] calibrated, grey uncalibrated)
const CALIBRATED_COLOUR = "#3b2a55", UNCALIBRATED_COLOUR = "#8d8d8d";

const state = {health: null, about: null, map: null, queue: [], result: null, token: sessionStorage.getItem("smse-token") || "",
               thumbs: new Map(), archiveThumbs: new Map(), colourBy: "class", seq: 0};
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
const known = (v) => v !== null && v !== undefined && Number.isFinite(v);
const count = (n, what) => `${Number(n).toLocaleString()} ${what}${n === 1 ? "" : "s"}`;
const ece = (v) => (known(v) ? `${(100 * v).toFixed(1)}%` : "not measured");
// a proportion with its 95% interval: "83.3% [62.5%, 100%]"
const withInterval = (a) => (a && known(a.value) ? pct(a.value) + (a.interval && known(a.interval[0]) &&
  known(a.interval[1]) ? ` [${pct(a.interval[0])}, ${pct(a.interval[1])}]` : " (no interval)") : "not measured");
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
    `${h.reference.size.toLocaleString()} reference images` +
    (h.archive ? ` · archive of ${count(h.archive.slides, "slide")}` : "") + ` · smse ${h.version}`;
  if (h.archive) {
    $("archive").hidden = false;
    $("archive-info").textContent = `(${count(h.archive.tiles, "tile")} of ${count(h.archive.slides, "slide")})`;
  }
  $("limits-hint").textContent = `PNG, JPEG, TIFF or BMP, any magnification; up to ${h.limits.max_files} images of ` +
    `${Math.round(h.limits.max_file_bytes / 2 ** 20)} MiB. BreakHis-style names give the magnification.`;
  $("footer").textContent = `References: ${h.reference.source}. Distances are squared L2 in the embedding; ` +
    `the map is a ${h.map.method} of the reference embeddings with the queries projected onto it.`;
  loadAbout();
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
  $("archive-body").replaceChildren("The archive's slides most like the case appear here.");
  $("archive-body").className = "placeholder";
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
  await Promise.all([renderResults(state.result), renderArchive(state.result)]);
  document.body.dataset.state = "done";
}

function bars(probabilities, predicted) {
  return el("div", {class: "bars"}, Object.entries(probabilities).map(([name, p]) => el("div", {class: "bar-row"},
    el("span", {class: "bar-name", text: name}),
    el("span", {class: "track"}, el("span", {class: "fill", style: {width: `${(100 * p).toFixed(1)}%`, background: classColour(name)}})),
    el("span", {class: `bar-value${name === predicted ? " best" : ""}`, text: pct(p)}))));
}

// whether the probabilities beside it are calibrated (temperature scaling on the validation patients)
function calibrationNote(cal, full = false) {
  if (!cal || cal.reason === "no_classes") return null;
  let text = cal.text;
  if (!full) {
    const v = cal.validation;
    text = cal.reason === "no_validation_patients" ? "Not calibrated: the run had no validation patients (T = 1)."
      : !cal.calibrated ? "Not calibrated (T = 1)."
      : `Calibrated: T = ${cal.temperature.toFixed(2)}` + (v ? `, fitted on ${count(v.images, "validation image")}` : "") + ".";
  }
  return el("p", {class: `calib muted${cal.calibrated ? "" : " uncalibrated"}`}, text, " ",
    el("a", {href: "#about", text: "About this model"}));
}

// the classes of an image's k nearest references, as counts: "malignant 4 of 5, benign 1 of 5"
function imageVote(neighbours) {
  const votes = new Map();
  for (const n of neighbours) votes.set(n.class, (votes.get(n.class) || 0) + 1);
  return el("p", {class: "vote small"}, `Its ${neighbours.length} nearest references: `,
    [...votes].sort((a, b) => b[1] - a[1]).map(([name, n], i) => [i ? ", " : "",
      el("b", {style: {color: classColour(name)}, text: name}), ` ${n} of ${neighbours.length}`]));
}

function renderCase(result) {
  const c = result.case;
  const votes = Object.values(c.neighbour_vote).reduce((a, b) => a + b, 0);
  $("case-body").className = "case";
  // (replaceChildren writes a null argument out as the text "null": the parts that may be absent are filtered)
  $("case-body").replaceChildren(...[
    el("div", {class: "verdict"},
      el("span", {class: "chip big", style: {background: classColour(c.predicted)}, text: c.predicted}),
      el("span", {class: "muted", text: `mean over ${c.images} image${c.images > 1 ? "s" : ""}`})),
    bars(c.probabilities, c.predicted),
    calibrationNote(result.calibration, true),
    el("p", {class: "vote"}, `Nearest-reference vote (${votes} neighbours): `,
      Object.entries(c.neighbour_vote).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1])
        .map(([name, n], i) => [i ? ", " : "", el("b", {style: {color: classColour(name)}, text: name}),
          ` ${n} of ${votes}`]),
      el("span", {class: "muted", text: ` (the ${result.k} nearest references of ` +
        (c.images > 1 ? `each of ${c.images} images)` : "the image)")})),
    c.out_of_distribution ? el("p", {class: "ood", role: "note", text: `${c.out_of_distribution} of ` +
      `${count(c.images, "image")} out of distribution: their class and neighbours are less reliable.`}) : null,
    el("table", {class: "images"}, el("tbody", {}, result.images.map((r, i) => el("tr", {},
      el("td", {}, el("a", {href: `#result-${i + 1}`, class: "number", text: String(i + 1)})),
      el("td", {text: r.magnification ? `${r.magnification}X` : "?"}),
      r.error ? el("td", {colspan: 2, class: "error", text: "unreadable"}) : [
        el("td", {}, el("span", {class: "chip", style: {background: classColour(r.predicted)}, text: r.predicted})),
        el("td", {class: "num", text: pct(r.probabilities[r.predicted])})]))))].filter((part) => part));
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
  const median = (part) => (part.quantiles.length ? `${part.quantiles[2].toPrecision(2)} ` +
    `(${count(part.pairs, "pair")})` : "not measured (no pairs)");
  return el("p", {class: "guide muted"}, "Reading d (median between references of other patients): same type " +
    `${median(g.same_type)}, same class ${median(g.same_class)}, other class ${median(g.other_class)}` +
    (g.ood_threshold === null ? "" : `; an image whose 5th nearest lies beyond ${g.ood_threshold.toPrecision(3)} ` +
     `is out of distribution (95th percentile over ${count(g.references, "reference")})`) + ".");
}

function oodDistance(r) {
  const g = state.health && state.health.distance_guide;
  const fifth = r.neighbours.length >= 5 ? r.neighbours[4].distance : null;
  return g && known(g.ood_threshold) && known(fifth)
    ? ` (5th nearest at d = ${fifth.toPrecision(3)}, beyond ${g.ood_threshold.toPrecision(3)})` : "";
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
          calibrationNote(result.calibration),
          imageVote(r.neighbours),
          r.out_of_distribution ? el("p", {class: "ood", role: "note", text: "Out of distribution: this image's " +
            "nearest references are farther than references usually are from each other" + oodDistance(r) +
            ". Class and neighbours are less reliable for this image."}) : null,
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

// ---------- the archive (smse serve --index): hit slides, thumbnails of their matching regions ----------

async function archiveThumbURL(id) {
  if (!state.archiveThumbs.has(id)) {
    state.archiveThumbs.set(id, api(`/api/archive/${id}/thumbnail`).then((r) => r.blob())
      .then((b) => URL.createObjectURL(b)));
  }
  return state.archiveThumbs.get(id);
}

function regionFigure(r) {
  const img = el("img", {alt: `archive tile ${r.id}: ${r.name}`});
  const loaded = archiveThumbURL(r.id).then((url) => new Promise((resolve) => {
    img.onload = img.onerror = resolve;
    img.src = url;
  })).catch(() => img.classList.add("broken"));
  const where = known(r.x) && known(r.y) ? `x ${Math.round(r.x)}, y ${Math.round(r.y)}` : "";
  const figure = el("figure", {class: "region", title: r.name}, img,
    el("figcaption", {},
      el("div", {}, el("b", {text: magName(r.magnification)}), where ? ` · ${where}` : ""),
      el("div", {class: "distance", text: `d = ${r.distance.toPrecision(3)} · image ${r.image + 1}`})));
  return {figure, loaded};
}

async function renderArchive(result) {
  const a = result.archive;
  if (!a) return;
  const body = $("archive-body");
  body.className = "archive-body";
  if (!a.slides.length) {
    body.replaceChildren("No archive slide matched the case.");
    return;
  }
  const pending = [];
  const slides = a.slides.map((s) => el("article", {class: "archive-slide"},
    el("div", {class: "archive-head"},
      el("span", {class: "slide-rank", text: `#${s.rank}`}),
      el("b", {class: "slide-name", text: s.slide}),
      s.label ? el("span", {class: "chip", style: {background: classColour(s.label)}, text: s.label})
        : el("span", {class: "muted", text: "label unknown"}),
      s.tumor_type && s.tumor_type !== s.label ? el("span", {class: "type", text: s.tumor_type}) : null,
      el("span", {class: "muted", text: `patient ${s.patient} · score ${s.score.toFixed(2)} from ` +
        `${count(s.votes, "vote")} · nearest d = ${s.best_distance.toPrecision(3)}`})),
    el("div", {class: "archive-regions"},
      s.regions.map((r) => {
        const f = regionFigure(r);
        pending.push(f.loaded);
        return f.figure;
      }),
      s.matching_regions > s.regions.length
        ? el("span", {class: "muted more", text: `+ ${count(s.matching_regions - s.regions.length, "more region")}`})
        : null)));
  body.replaceChildren(el("p", {class: "muted small", text: `Ranked by votes: ${a.rule}. Searched ` +
    `${count(a.tiles, "tile")} of ${count(a.slides_in_index, "slide")}; the nearest matching regions of each slide ` +
    "are shown."}), ...slides);
  await Promise.all(pending);
}

// ---------- about this model: test accuracy with n and 95% intervals, calibration ----------

async function loadAbout() {
  try {
    state.about = await (await api("/api/about")).json();
  } catch (error) {
    $("about-body").replaceChildren(`Not available: ${error.message}`);
    return;
  }
  renderAbout(state.about);
}

function renderAbout(about) {
  const ev = about.evaluation, cal = about.calibration;
  const text = [];
  if (ev) {
    const rows = [["classifier (the probabilities above)", ev.head]];
    if (ev.knn) rows.push([`nearest-reference vote (k = ${ev.knn.k})`, ev.knn]);
    const method = ev.head.interval_method;
    text.push(el("h4", {text: "Accuracy on the test patients"}),
      el("table", {class: "accuracy"},
        el("thead", {}, el("tr", {}, el("th", {}),
          el("th", {text: `patient level (n = ${count(ev.patients, "patient")})`}),
          el("th", {text: `image level (n = ${count(ev.images, "image")})`}))),
        el("tbody", {}, rows.map(([name, a]) => el("tr", {}, el("th", {text: name}),
          el("td", {text: withInterval(a.patient_accuracy)}), el("td", {text: withInterval(a.image_accuracy)}))))),
      el("p", {class: "muted small", text: `Test set: n = ${count(ev.images, "image")} of ` +
        `${count(ev.patients, "patient")} the model never saw in training (the ${ev.checkpoint} checkpoint, ` +
        `epoch ${ev.epoch}). [low, high]: ${Math.round(100 * ev.confidence)}% interval` +
        (method ? ` (${method}${method === "patient bootstrap" ? ": a patient's images are resampled together" : ""})`
          : "") + "."}));
  }
  if (about.evaluation_note) text.push(el("p", {class: ev ? "stale" : "note", text: about.evaluation_note}));
  if (cal && cal.reason !== "no_classes") {
    text.push(el("h4", {text: "Are the probabilities right?"}), el("p", {class: "calib-text", text: cal.text}));
    if (ev && ev.calibration) {
      const c = ev.calibration;
      text.push(el("p", {text: `On the n = ${count(c.images, "test image")} the expected calibration error is ` +
        `${ece(c.ece)}` + (Math.abs(c.temperature - 1) > 1e-6 ? ` (uncalibrated, T = 1: ${ece(c.ece_uncalibrated)})` : "") +
        ": of the images given a probability of about p, a share of about p should be right. Temperature scaling " +
        "changes no class, only the confidence."}));
    }
  }
  const figure = ev && ev.calibration ? reliabilityFigure(ev.calibration) : null;
  $("about-body").className = "about-body";
  $("about-body").replaceChildren(el("div", {class: "about-text"}, text), ...(figure ? [figure] : []));
}

// accuracy against confidence per bin, as the report's reliability diagram draws it from the same metrics
function reliabilityFigure(c) {
  const W = 300, H = 250, L = 38, R = 10, T = 10, B = 34;
  const sx = (v) => (L + (W - L - R) * v).toFixed(1), sy = (v) => (H - B - (H - T - B) * v).toFixed(1);
  const calibrated = Math.abs(c.temperature - 1) > 1e-6;
  const series = calibrated
    ? [[c.reliability_uncalibrated, `uncalibrated, T = 1 (ECE ${ece(c.ece_uncalibrated)})`, UNCALIBRATED_COLOUR],
       [c.reliability, `calibrated, T = ${c.temperature.toFixed(2)} (ECE ${ece(c.ece)})`, CALIBRATED_COLOUR]]
    : [[c.reliability, `not calibrated, T = 1 (ECE ${ece(c.ece)})`, CALIBRATED_COLOUR]];
  const ticks = [0, 0.25, 0.5, 0.75, 1];
  const drawn = series.map(([bins, , colour], s) => {
    const pts = (bins ? bins.count : []).map((n, b) => [bins.confidence[b], bins.accuracy[b], n])
      .filter(([x, y, n]) => n > 0 && known(x) && known(y));
    return el("g", {class: "series"},
      pts.length > 1 ? el("path", {d: pts.map(([x, y], i) => `${i ? "L" : "M"}${sx(x)},${sy(y)}`).join(""),
        fill: "none", stroke: colour, "stroke-width": 1.6}) : null,
      pts.map(([x, y, n]) => el("g", {},
        el("circle", {cx: sx(x), cy: sy(y), r: 3.5, fill: colour}),
        el("text", {x: (+sx(x) + 5).toFixed(1), y: (+sy(y) + (s ? -5 : 12)).toFixed(1), class: "count", fill: colour,
                    text: String(n)}))));
  });
  const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", id: "reliability",
                         "aria-label": `reliability diagram of ${c.images} test images`},
    el("rect", {x: L, y: T, width: W - L - R, height: H - T - B, class: "plot-bg"}),
    ticks.map((v) => el("g", {class: "tick"},
      el("line", {x1: sx(v), x2: sx(v), y1: sy(0), y2: sy(0) + 4}),
      el("line", {x1: L - 4, x2: L, y1: sy(v), y2: sy(v)}),
      el("text", {x: sx(v), y: sy(0) + 14, "text-anchor": "middle", text: String(v)}),
      el("text", {x: L - 6, y: +sy(v) + 3, "text-anchor": "end", text: String(v)}))),
    el("line", {x1: sx(0), y1: sy(0), x2: sx(1), y2: sy(1), class: "diagonal"}),
    drawn,
    el("text", {x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle", class: "axis",
                text: "confidence (probability of the predicted class)"}),
    el("text", {x: 10, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis",
                transform: `rotate(-90 10 ${(T + H - B) / 2})`, text: "accuracy"}));
  return el("figure", {class: "reliability"}, svg,
    el("div", {class: "legend"}, series.map(([, name, colour]) => el("span", {}, el("i", {style: {background: colour}}), name)),
      el("span", {}, el("i", {class: "dash"}), "perfectly calibrated")),
    el("figcaption", {text: `Reliability diagram on the n = ${count(c.images, "test image")}: accuracy against ` +
      "confidence per bin of confidence; the number by each point is how many images it holds (few images: noisy)."}));
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
