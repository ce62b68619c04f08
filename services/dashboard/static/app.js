// staleflow dashboard: polls the run directories' JSONL through /api/metrics (incremental byte offsets) and draws
// the panels from /api/panels with uPlot (bundled) plus a canvas heatmap for the staleness histogram.
// Each panel sets data-ready="true" once it drew a non-empty series (the headless-browser test checks this).
"use strict";

const PALETTE = ["#5ec4ff", "#ff9f43", "#4cd964", "#ff6b81", "#a78bfa", "#ffd166", "#2dd4bf", "#f472b6",
  "#94a3b8", "#c0ca33"];
const DASHES = [[], [6, 4], [2, 3], [10, 3, 2, 3], [1, 5]];
const FILES = ["metrics", "rollout", "eval"];
const POLL_MS = 2000;
const RUNS_MS = 10000;
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

const state = {
  panels: [], runs: [], selected: new Set(), touched: false, data: new Map(), charts: new Map(),
  xmode: "step", polls: 0, busy: false, again: false,
};

// ---------------------------------------------------------------------------------------------------- data

function runData(id) {
  if (!state.data.has(id)) {
    state.data.set(id, {
      metrics: [], rollout: [], eval: [], offsets: { metrics: 0, rollout: 0, eval: 0 }, t0: null,
      names: { metrics: new Set(), rollout: new Set(), eval: new Set() }, workers: new Map(),
    });
  }
  return state.data.get(id);
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

function ingest(d, file, rec) {
  d[file].push(rec);
  for (const k in rec) {
    d.names[file].add(k);
    if (file === "rollout" && rec.worker !== undefined) {
      if (!d.workers.has(k)) d.workers.set(k, new Set());
      d.workers.get(k).add(String(rec.worker));
    }
  }
  if (typeof rec.time === "number" && (d.t0 === null || rec.time < d.t0)) d.t0 = rec.time;
}

async function pull(id) {
  const d = runData(id);
  let changed = false;
  for (const file of FILES) {
    for (let page = 0; page < 100; page++) {
      const res = await getJSON(`/api/metrics?run=${encodeURIComponent(id)}&file=${file}&offset=${d.offsets[file]}`);
      if (res.reset) { d[file] = []; d.names[file].clear(); changed = true; }
      for (const rec of res.records) ingest(d, file, rec);
      changed = changed || res.records.length > 0;
      d.offsets[file] = res.offset;
      if (!res.more) break;
    }
  }
  return changed;
}

function selectedRuns() {
  return state.runs.map(r => r.id).filter(id => state.selected.has(id));
}

function runName(id) {
  const r = state.runs.find(r => r.id === id);
  return r ? r.name : id;
}

// A panel key is a metric name, or a prefix ending in "/" (buffer/drops/ -> every drop reason).
// Lookup order per run: eval.jsonl, metrics.jsonl (learner records), rollout.jsonl (one series per worker).
function seriesFor(panel, runIdx, id) {
  const d = runData(id);
  const out = [];
  for (const key of panel.keys) {
    const all = new Set([...d.names.eval, ...d.names.metrics, ...d.names.rollout]);
    const names = key.endsWith("/") ? [...all].filter(n => n.startsWith(key)).sort() : [key];
    for (const name of names) {
      const src = ["eval", "metrics"].find(f => d.names[f].has(name));
      if (src) out.push({ run: id, runIdx, name, src, worker: null });
      else if (d.names.rollout.has(name)) {
        for (const w of [...(d.workers.get(name) || [])].sort()) {
          out.push({ run: id, runIdx, name, src: "rollout", worker: w });
        }
      }
    }
  }
  return out;
}

function xOf(rec, d, xmode) {
  return xmode === "time" ? rec.time - d.t0 : rec.step;
}

// [xs, ys] sorted by x with unique xs (uPlot's requirement); a repeated x keeps the last value.
function table(s, xmode) {
  const d = runData(s.run);
  const xs = [], ys = [];
  for (const r of d[s.src]) {
    if (s.worker !== null && String(r.worker) !== s.worker) continue;
    const v = r[s.name];
    if (v === undefined) continue;
    const x = xOf(r, d, xmode);
    if (typeof x !== "number" || !isFinite(x)) continue;
    const y = typeof v === "number" ? v : null;
    const last = xs.length ? xs[xs.length - 1] : -Infinity;
    if (x < last) continue;
    if (x === last) { ys[ys.length - 1] = y; continue; }
    xs.push(x); ys.push(y);
  }
  return [xs, ys];
}

// ---------------------------------------------------------------------------------------------------- drawing

function fmt(v) {
  if (v === null || v === undefined) return "—";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 1 || a === 0) return String(Number(v.toFixed(2)));
  return String(Number(v.toPrecision(3)));
}

function axis(label, log) {
  // A log axis gets a tick per 1..9 x 10^k: label only the powers of ten so the labels do not collide.
  const values = log ? (u, vals) => vals.map(v => { const e = Math.log10(v); return Math.abs(e - Math.round(e)) < 1e-6 ? fmt(v) : ""; })
    : (u, vals) => vals.map(fmt);
  return {
    stroke: "#8a93a6", grid: { stroke: "#232a36", width: 1 }, ticks: { stroke: "#2a3140", width: 1, size: 4 },
    label, labelSize: label ? 16 : 0, labelFont: "11px system-ui, sans-serif", font: "11px system-ui, sans-serif",
    size: 52, values,
  };
}

function setReady(el, points) {
  el.dataset.ready = points > 0 ? "true" : "false";
  el.dataset.points = String(points);
}

function renderLine(panel, el) {
  const host = el.querySelector(".chart");
  const runs = selectedRuns();
  const multi = runs.length > 1;
  const series = [];
  runs.forEach((id, i) => series.push(...seriesFor(panel, i, id)));
  const xmode = series.some(s => s.src === "rollout") ? "time" : state.xmode;
  const tables = series.map(s => table(s, xmode));
  const points = tables.reduce((n, t) => n + t[1].filter(v => v !== null).length, 0);
  const old = state.charts.get(panel.id);
  if (!series.length || !points) {
    if (old) { old.chart.destroy(); state.charts.delete(panel.id); }
    setReady(el, 0);
    return;
  }
  const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
  const positive = tables.every(t => t[1].every(v => v === null || v > 0));
  const logY = panel.log_y && positive;
  const perRun = new Map();
  const specs = series.map((s, i) => {
    const k = perRun.get(s.runIdx) || 0;
    perRun.set(s.runIdx, k + 1);
    const label = `${multi ? runName(s.run) + " · " : ""}${s.name}${s.worker !== null ? " [" + s.worker + "]" : ""}`;
    const n = tables[i][0].length;
    return {
      label, stroke: multi ? PALETTE[s.runIdx % PALETTE.length] : PALETTE[i % PALETTE.length],
      dash: multi ? DASHES[k % DASHES.length] : [], width: 1.6, spanGaps: true,
      points: { show: n <= 12, size: 5 }, value: (u, v) => fmt(v),
    };
  });
  const signature = JSON.stringify([xmode, logY, specs.map(s => s.label), host.clientWidth]);
  if (old && old.signature === signature) {
    old.chart.setData(data);
  } else {
    if (old) old.chart.destroy();
    host.innerHTML = "";
    const chart = new uPlot({
      width: Math.max(200, host.clientWidth), height: 210,
      scales: { x: { time: false }, y: logY ? { distr: 3 } : {} },
      axes: [axis(xmode === "time" ? "seconds since start" : "learner step"), axis(panel.unit, logY)],
      series: [{ label: xmode === "time" ? "t (s)" : "step", value: (u, v) => fmt(v) }, ...specs],
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
    }, data, host);
    state.charts.set(panel.id, { chart, signature });
  }
  setReady(el, points);
}

function colormap(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((a, j) => Math.round(a + f * (VIRIDIS[i + 1][j] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function histColumns(id, key) {
  const d = runData(id);
  const cols = [];
  for (const r of d.metrics) {
    const h = r[key];
    if (!h || typeof h !== "object") continue;
    const counts = new Map();
    let total = 0;
    for (const [k, v] of Object.entries(h)) {
      const s = Number(k), n = Number(v);
      if (!isFinite(s) || !isFinite(n) || n <= 0) continue;
      counts.set(s, (counts.get(s) || 0) + n);
      total += n;
    }
    if (total > 0) cols.push({ x: xOf(r, d, state.xmode), counts, total });
  }
  return cols;
}

function drawHeatmap(canvas, cols, width, height) {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.height = height + "px";
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  const m = { l: 52, r: 64, t: 6, b: 24 };
  const pw = width - m.l - m.r, ph = height - m.t - m.b;
  let yMax = 0, maxShare = 0;
  for (const c of cols) for (const [s, n] of c.counts) { yMax = Math.max(yMax, s); maxShare = Math.max(maxShare, n / c.total); }
  const rows = Math.floor(yMax) + 1, cw = pw / cols.length, rh = ph / rows;
  g.fillStyle = "#11151c";
  g.fillRect(m.l, m.t, pw, ph);
  cols.forEach((c, i) => {
    for (const [s, n] of c.counts) {
      g.fillStyle = colormap(Math.sqrt(n / c.total / maxShare));  // sqrt: the tail stays visible
      g.fillRect(m.l + i * cw, m.t + ph - (Math.floor(s) + 1) * rh, Math.ceil(cw), Math.ceil(rh));
    }
  });
  // The mean staleness per step, so drift is readable at a glance.
  g.strokeStyle = "rgba(255,255,255,0.85)";
  g.lineWidth = 1.5;
  g.beginPath();
  cols.forEach((c, i) => {
    let sum = 0;
    for (const [s, n] of c.counts) sum += s * n;
    const y = m.t + ph - (sum / c.total + 0.5) * rh, x = m.l + (i + 0.5) * cw;
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  g.fillStyle = "#8a93a6";
  g.font = "11px system-ui, sans-serif";
  g.textAlign = "right";
  g.textBaseline = "middle";
  const yStep = Math.max(1, Math.ceil(rows / Math.max(2, Math.floor(ph / 22))));
  for (let s = 0; s < rows; s += yStep) g.fillText(String(s), m.l - 6, m.t + ph - (s + 0.5) * rh);
  g.textAlign = "center";
  g.textBaseline = "top";
  const xStep = Math.max(1, Math.ceil(cols.length / Math.max(2, Math.floor(pw / 70))));
  for (let i = 0; i < cols.length; i += xStep) g.fillText(fmt(cols[i].x), m.l + (i + 0.5) * cw, m.t + ph + 5);
  g.save();
  g.translate(12, m.t + ph / 2);
  g.rotate(-Math.PI / 2);
  g.fillText("staleness", 0, -6);
  g.restore();
  // Colour bar: share of the step's batch.
  const bx = width - m.r + 14, bw = 10;
  for (let y = 0; y < ph; y++) {
    g.fillStyle = colormap(Math.sqrt(1 - y / ph));
    g.fillRect(bx, m.t + y, bw, 1);
  }
  g.fillStyle = "#8a93a6";
  g.textAlign = "left";
  g.textBaseline = "top";
  g.fillText((100 * maxShare).toFixed(0) + "%", bx + bw + 4, m.t);
  g.textBaseline = "bottom";
  g.fillText("0%", bx + bw + 4, m.t + ph);
  canvas.onmousemove = ev => {
    const r = canvas.getBoundingClientRect();
    const i = Math.floor((ev.clientX - r.left - m.l) / cw), s = Math.floor((m.t + ph - (ev.clientY - r.top)) / rh);
    const c = cols[i];
    if (!c || s < 0 || s >= rows) { canvas.title = ""; return; }
    const n = c.counts.get(s) || 0;
    canvas.title = `${state.xmode === "time" ? "t" : "step"} ${fmt(c.x)} · staleness ${s}: ${n} samples ` +
      `(${(100 * n / c.total).toFixed(1)}%)`;
  };
}

function renderHeatmap(panel, el) {
  const host = el.querySelector(".chart");
  const runs = selectedRuns();
  const withData = runs.map(id => [id, histColumns(id, panel.keys[0])]).filter(([, cols]) => cols.length);
  host.innerHTML = "";
  const height = withData.length > 1 ? Math.max(110, Math.floor(230 / withData.length)) : 230;
  for (const [id, cols] of withData) {
    const box = document.createElement("div");
    box.className = "heat";
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = `${runName(id)} — ${cols.length} steps; white line: mean`;
    const canvas = document.createElement("canvas");
    box.append(label, canvas);
    host.append(box);
    drawHeatmap(canvas, cols, Math.max(200, host.clientWidth), height);
  }
  setReady(el, withData.reduce((n, [, cols]) => n + cols.length, 0));
}

function renderAll(force) {
  if (force) { for (const c of state.charts.values()) c.chart.destroy(); state.charts.clear(); }
  for (const panel of state.panels) {
    const el = document.getElementById("panel-" + panel.id);
    if (panel.kind === "heatmap") renderHeatmap(panel, el); else renderLine(panel, el);
  }
}

function buildPanels() {
  const main = document.getElementById("panels");
  for (const p of state.panels) {
    const el = document.createElement("section");
    el.className = "panel" + (p.kind === "heatmap" ? " wide" : "");
    el.id = "panel-" + p.id;
    el.dataset.panel = p.id;
    el.dataset.ready = "false";
    const h = document.createElement("h2");
    h.textContent = p.title;
    if (p.unit) { const u = document.createElement("span"); u.className = "unit"; u.textContent = p.unit; h.append(u); }
    const help = document.createElement("p");
    help.className = "help";
    help.textContent = p.help || p.keys.join(", ");
    const chart = document.createElement("div");
    chart.className = "chart";
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "no data yet";
    el.append(h, help, chart, empty);
    main.append(el);
  }
}

// ---------------------------------------------------------------------------------------------------- runs

function hashRuns() {
  const m = /(?:^#|&)runs=([^&]*)/.exec(location.hash);
  return m ? decodeURIComponent(m[1]).split(",").filter(Boolean) : null;
}

function renderRuns() {
  const box = document.getElementById("runs");
  box.innerHTML = "";
  const sel = selectedRuns();
  for (const r of state.runs) {
    const chip = document.createElement("label");
    chip.className = "run";
    const cb = document.createElement("input");
    cb.type = "checkbox";
    cb.checked = state.selected.has(r.id);
    cb.onchange = () => {
      state.touched = true;
      if (cb.checked) state.selected.add(r.id); else state.selected.delete(r.id);
      history.replaceState(null, "", "#runs=" + encodeURIComponent(selectedRuns().join(",")));
      renderRuns();
      refresh(true);
    };
    const sw = document.createElement("span");
    sw.className = "swatch";
    const idx = sel.indexOf(r.id);
    sw.style.background = idx >= 0 && sel.length > 1 ? PALETTE[idx % PALETTE.length] : "#3a4252";
    const name = document.createElement("span");
    name.textContent = r.name;
    const meta = document.createElement("span");
    meta.className = r.live ? "live" : "meta";
    meta.textContent = r.live ? "live" : new Date(r.updated * 1000).toLocaleString();
    chip.append(cb, sw, name, meta);
    box.append(chip);
  }
}

async function loadRuns() {
  const res = await getJSON("/api/runs");
  const before = new Set(state.runs.map(r => r.id));
  state.runs = res.runs;
  if (!state.touched) {
    const wanted = hashRuns();
    if (wanted) state.selected = new Set(wanted);
    else {
      // Default: the four most recently updated runs (runs come oldest first).
      const fresh = state.runs.filter(r => !before.has(r.id)).map(r => r.id);
      for (const id of fresh) state.selected.add(id);
      const ids = state.runs.map(r => r.id).filter(id => state.selected.has(id));
      for (const id of ids.slice(0, Math.max(0, ids.length - 4))) state.selected.delete(id);
    }
  }
  renderRuns();
}

async function refresh(force) {
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  const status = document.getElementById("status");
  try {
    let changed = !!force;
    for (const id of selectedRuns()) changed = (await pull(id)) || changed;
    if (changed) renderAll(false);
    state.polls += 1;
    document.body.dataset.polls = String(state.polls);
    const live = state.runs.some(r => r.live && state.selected.has(r.id));
    status.className = "status" + (live ? " live" : "");
    status.textContent = `${selectedRuns().length}/${state.runs.length} runs · ${live ? "live · " : ""}updated ` +
      new Date().toLocaleTimeString();
  } catch (e) {
    status.className = "status";
    status.textContent = "error: " + e.message;
  } finally {
    state.busy = false;
  }
  if (state.again) { state.again = false; refresh(true); }
}

async function main() {
  const xsel = document.getElementById("xmode");
  xsel.onchange = () => { state.xmode = xsel.value; renderAll(true); };
  state.panels = await getJSON("/api/panels");
  buildPanels();
  await loadRuns();
  await refresh(true);
  setInterval(refresh, POLL_MS);
  setInterval(() => loadRuns().then(() => refresh(false)).catch(() => {}), RUNS_MS);
  let t = null;
  window.addEventListener("resize", () => { clearTimeout(t); t = setTimeout(() => renderAll(true), 150); });
}

main().catch(e => { document.getElementById("status").textContent = "error: " + e.message; });
