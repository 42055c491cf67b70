// The dashboard's single self-contained HTML page (inline CSS, JS and SVG; no external assets) that polls /api/state.
//
// Everything that comes from peers (ids, device names, event text) is untrusted: the script only ever puts it
// into the page through textContent / setAttribute, never innerHTML.

export const DASHBOARD_HTML = String.raw`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>swarmtune dashboard</title>
<style>
  :root { --bg:#0f1419; --panel:#171d24; --line:#2a333d; --text:#d8dee6; --dim:#8591a0; --accent:#5cc8ff;
          --ok:#4cc38a; --slow:#e5b454; --dead:#e5534b; --banned:#b55bd8; --spare:#8591a0; --lr:#c792ea; --tps:#f78c6c; }
  * { box-sizing: border-box; }
  body { margin:0; background:var(--bg); color:var(--text); font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; }
  header { display:flex; flex-wrap:wrap; align-items:center; gap:16px; padding:14px 20px; border-bottom:1px solid var(--line); }
  header h1 { font-size:18px; margin:0; letter-spacing:.5px; }
  header h1 span { color:var(--accent); }
  .meta { color:var(--dim); font-size:13px; }
  .badge { display:inline-block; padding:2px 8px; border-radius:10px; font-size:12px; font-weight:600; text-transform:uppercase; }
  .st-waiting { background:#2b3440; color:var(--slow); } .st-training { background:#14352a; color:var(--ok); }
  .st-finished { background:#17324a; color:var(--accent); } .st-failed { background:#3d1b1b; color:var(--dead); }
  #conn { margin-left:auto; font-size:12px; color:var(--dim); }
  #conn.down { color:var(--dead); }
  main { display:grid; grid-template-columns: repeat(12, 1fr); gap:14px; padding:14px 20px 24px; }
  .panel { background:var(--panel); border:1px solid var(--line); border-radius:8px; padding:12px 14px; min-width:0; }
  .panel h2 { margin:0 0 8px; font-size:13px; color:var(--dim); text-transform:uppercase; letter-spacing:.6px; font-weight:600; }
  .w12 { grid-column: span 12; } .w8 { grid-column: span 8; } .w6 { grid-column: span 6; } .w4 { grid-column: span 4; }
  @media (max-width: 1000px) { .w8, .w6, .w4 { grid-column: span 12; } }
  .kpis { display:grid; grid-template-columns: repeat(6, 1fr); gap:10px; }
  .kpi .v { font-size:22px; font-weight:600; font-variant-numeric: tabular-nums; }
  .kpi .k { font-size:12px; color:var(--dim); }
  .progress { height:8px; background:#232b35; border-radius:4px; overflow:hidden; margin-top:10px; }
  .progress > div { height:100%; background:linear-gradient(90deg, var(--accent), var(--ok)); width:0; transition: width .4s; }
  svg text { fill:var(--dim); font-size:11px; font-family: system-ui, sans-serif; }
  svg .axis { stroke:var(--line); } svg .grid { stroke:#222a33; }
  table { width:100%; border-collapse:collapse; font-variant-numeric: tabular-nums; }
  th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); white-space:nowrap; }
  th { color:var(--dim); font-weight:600; font-size:12px; }
  td.num, th.num { text-align:right; }
  .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size:12px; }
  .h-ok { color:var(--ok); } .h-slow { color:var(--slow); } .h-dead { color:var(--dead); } .h-banned { color:var(--banned); } .h-spare { color:var(--spare); }
  #events { list-style:none; margin:0; padding:0; max-height:260px; overflow:auto; font-size:13px; }
  #events li { padding:4px 0; border-bottom:1px solid #1f262e; }
  #events .t { color:var(--dim); margin-right:8px; font-variant-numeric: tabular-nums; }
  #events .kind { display:inline-block; min-width:96px; font-weight:600; }
  .empty { color:var(--dim); font-style:italic; padding:8px 0; }
</style>
</head>
<body>
<header>
  <h1><span>swarm</span>tune</h1>
  <span id="state" class="badge st-waiting">waiting</span>
  <span class="meta">run <b id="run-id" class="mono">–</b></span>
  <span class="meta">model <b id="model">–</b></span>
  <span id="conn">connecting…</span>
</header>
<main>
  <section class="panel w12">
    <div class="kpis">
      <div class="kpi"><div class="v" id="step-text">0 / 0</div><div class="k">optimizer step<span id="eta"></span></div></div>
      <div class="kpi"><div class="v" id="loss-text">–</div><div class="k">loss (last step)</div></div>
      <div class="kpi"><div class="v" id="tps-text">–</div><div class="k">tokens / s</div></div>
      <div class="kpi"><div class="v" id="lr-text">–</div><div class="k">learning rate</div></div>
      <div class="kpi"><div class="v" id="peers-text">0</div><div class="k">peers (min <span id="min-peers">0</span>)</div></div>
      <div class="kpi"><div class="v" id="totals-text">0 / 0 / 0</div><div class="k">retries / reassigns / bans</div></div>
    </div>
    <div class="progress"><div id="progress-bar"></div></div>
  </section>
  <section class="panel w12">
    <h2>Pipeline</h2>
    <svg id="pipeline" viewBox="0 0 1000 170" width="100%" role="img" aria-label="pipeline stages and replicas"></svg>
  </section>
  <section class="panel w6"><h2>Loss</h2><svg id="loss-chart" viewBox="0 0 600 220" width="100%"></svg></section>
  <section class="panel w6"><h2>Learning rate</h2><svg id="lr-chart" viewBox="0 0 600 220" width="100%"></svg></section>
  <section class="panel w12" style="overflow-x:auto">
    <h2>Peers</h2>
    <table>
      <thead><tr><th>peer</th><th>stage</th><th>layers</th><th>device</th><th class="num">memory</th><th class="num">GFLOP/s</th><th class="num">tokens/s</th><th>health</th><th class="num">last seen</th><th>network</th></tr></thead>
      <tbody id="peers-body"></tbody>
    </table>
  </section>
  <section class="panel w6"><h2>Throughput (tokens/s)</h2><svg id="tps-chart" viewBox="0 0 600 220" width="100%"></svg></section>
  <section class="panel w6"><h2>Events</h2><ul id="events"></ul></section>
</main>
<script>
"use strict";
const SVG = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const pollMs = Math.max(100, Number(params.get('pollMs')) || 1000);

function el(tag, attrs, text) {
  const e = tag.startsWith('svg:') ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}
function fmtNum(x, digits) {
  if (x === null || x === undefined || !Number.isFinite(x)) return '–';
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2);
  return x.toFixed(digits);
}
function fmtBytes(b) {
  if (!Number.isFinite(b) || b <= 0) return '–';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB']; let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return b.toFixed(b < 10 ? 1 : 0) + ' ' + u[i];
}
function fmtDuration(ms) {
  const s = Math.round(ms / 1000);
  return s < 60 ? s + ' s' : s < 3600 ? Math.floor(s / 60) + ' min ' + (s % 60) + ' s' : Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
}
function shortId(id) { return id.length > 14 ? id.slice(0, 6) + '…' + id.slice(-6) : id; }
function ago(ms) {
  if (!ms) return '–';
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 60 ? s.toFixed(0) + ' s' : (s / 60).toFixed(0) + ' min';
}
function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = []; for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return { lo: Math.min(lo, ticks[0]), hi: Math.max(hi, ticks[ticks.length - 1]), ticks };
}

/** Line chart of series [{points:[[x,y]], color, width, label}] into an svg with viewBox 600x220. */
function lineChart(svg, series, opts) {
  svg.replaceChildren();
  const W = 600, H = 220, L = 56, R = 12, T = 10, B = 26;
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  svg.setAttribute('data-n', String(series.length ? series[0].points.length : 0));
  if (all.length === 0) { svg.appendChild(el('svg:text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'waiting for the first step…')); return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const xMin = Math.min(...xs), xMax = Math.max(xs.length > 1 ? Math.max(...xs) : xMin + 1, xMin + 1);
  const yt = niceTicks(opts.zeroBase ? Math.min(0, ...ys) : Math.min(...ys), Math.max(...ys), 4);
  const sx = (x) => L + (x - xMin) / (xMax - xMin) * (W - L - R);
  const sy = (y) => T + (1 - (y - yt.lo) / (yt.hi - yt.lo)) * (H - T - B);
  for (const t of yt.ticks) {
    svg.appendChild(el('svg:line', { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: 'grid' }));
    svg.appendChild(el('svg:text', { x: L - 6, y: sy(t) + 4, 'text-anchor': 'end' }, fmtNum(t, opts.digits)));
  }
  const xt = niceTicks(xMin, xMax, 5);
  for (const t of xt.ticks) if (t >= xMin && t <= xMax && Number.isInteger(t)) svg.appendChild(el('svg:text', { x: sx(t), y: H - 8, 'text-anchor': 'middle' }, t));
  svg.appendChild(el('svg:line', { x1: L, x2: L, y1: T, y2: H - B, class: 'axis' }));
  svg.appendChild(el('svg:line', { x1: L, x2: W - R, y1: H - B, y2: H - B, class: 'axis' }));
  series.forEach((s, i) => {
    // a long run has thousands of steps: draw at most ~1000 vertices per line (always keeping the newest)
    const stride = Math.ceil(s.points.length / 1000);
    const shown = stride <= 1 ? s.points : s.points.filter((_, j) => j % stride === 0 || j === s.points.length - 1);
    const pts = shown.filter((p) => Number.isFinite(p[1])).map((p) => sx(p[0]).toFixed(1) + ',' + sy(p[1]).toFixed(1)).join(' ');
    svg.appendChild(el('svg:polyline', { points: pts, fill: 'none', stroke: s.color, 'stroke-width': s.width || 1.5, 'stroke-linejoin': 'round', 'data-series': s.label, opacity: s.opacity || 1 }));
    if (s.points.length === 1) { const p = s.points[0]; svg.appendChild(el('svg:circle', { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: s.color })); }
    if (s.label) svg.appendChild(el('svg:text', { x: W - R - 4, y: T + 12 + i * 14, 'text-anchor': 'end', style: 'fill:' + s.color }, s.label));
  });
}

function ema(values, alpha) {
  const out = []; let m = null;
  for (const v of values) { m = m === null ? v : alpha * v + (1 - alpha) * m; out.push(m); }
  return out;
}

function drawPipeline(svg, state) {
  svg.replaceChildren();
  const stages = state.stages || [];
  const byId = new Map((state.peers || []).map((p) => [p.peerId, p]));
  const maxRep = Math.max(1, ...stages.map((s) => s.replicas.length));
  // the drawing grows with the largest replica set instead of leaving empty space under one or two peers
  const W = 1000, H = Math.max(96, 52 + maxRep * 38);
  svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
  if (stages.length === 0) {
    svg.appendChild(el('svg:text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'no plan yet: waiting for ' + state.minPeers + ' peer(s)'));
    return;
  }
  const L = 90, R = 90, gap = 36, colW = (W - L - R - gap * (stages.length - 1)) / stages.length;
  const repH = 34;
  svg.appendChild(el('svg:text', { x: 8, y: H / 2 - 4 }, 'tokens →'));
  svg.appendChild(el('svg:text', { x: W - R + 14, y: H / 2 - 4 }, '→ loss'));
  svg.appendChild(el('svg:text', { x: W - R + 14, y: H / 2 + 12 }, '← grads'));
  stages.forEach((s, i) => {
    const x = L + i * (colW + gap);
    const g = el('svg:g', { 'data-stage': s.index });
    g.appendChild(el('svg:rect', { x, y: 6, width: colW, height: H - 12, rx: 8, fill: '#1d252e', stroke: '#2f3a46' }));
    g.appendChild(el('svg:text', { x: x + 10, y: 24, style: 'fill:#d8dee6;font-weight:600' }, 'stage ' + s.index));
    g.appendChild(el('svg:text', { x: x + colW - 10, y: 24, 'text-anchor': 'end' }, 'layers ' + s.layerStart + '–' + (s.layerEnd - 1)));
    if (s.replicas.length === 0) g.appendChild(el('svg:text', { x: x + 10, y: 50, style: 'fill:#e5534b' }, 'no replica'));
    s.replicas.forEach((id, j) => {
      const p = byId.get(id), health = p ? p.health : 'dead', y = 36 + j * (repH + 4);
      const color = getComputedStyle(document.documentElement).getPropertyValue('--' + health) || '#8591a0';
      g.appendChild(el('svg:rect', { x: x + 8, y, width: colW - 16, height: repH, rx: 5, fill: '#111820', stroke: color, 'stroke-width': 1.5 }));
      g.appendChild(el('svg:text', { x: x + 16, y: y + repH / 2 + 4, class: 'mono', style: 'fill:#d8dee6' }, shortId(id)));
      g.appendChild(el('svg:text', { x: x + colW - 16, y: y + repH / 2 + 4, 'text-anchor': 'end', style: 'fill:' + color }, p ? fmtNum(p.tokensPerSecond, 0) + ' tok/s' : 'gone'));
    });
    svg.appendChild(g);
    const ax = i === 0 ? L - 22 : x - gap + 4, bx = i === 0 ? L - 4 : x - 4;
    svg.appendChild(el('svg:path', { d: 'M' + ax + ' ' + (H / 2) + ' L' + bx + ' ' + (H / 2) + ' l-6 -4 m6 4 l-6 4', stroke: '#5cc8ff', fill: 'none', 'stroke-width': 1.5 }));
  });
}

function renderPeers(state) {
  const body = $('peers-body');
  const rows = (state.peers || []).slice().sort((a, b) => (a.stageIndex ?? 1e9) - (b.stageIndex ?? 1e9) || a.peerId.localeCompare(b.peerId));
  body.replaceChildren();
  if (rows.length === 0) { const tr = el('tr'); tr.appendChild(el('td', { colspan: 10, class: 'empty' }, 'no peers yet')); body.appendChild(tr); return; }
  for (const p of rows) {
    const tr = el('tr', { 'data-peer': p.peerId });
    const id = el('td', { class: 'mono', title: p.peerId }, shortId(p.peerId));
    tr.append(id,
      el('td', {}, p.stageIndex === null ? '–' : p.stageIndex),
      el('td', {}, p.layerStart === null ? '–' : p.layerStart + '–' + (p.layerEnd - 1)),
      el('td', { title: p.device }, p.device.length > 36 ? p.device.slice(0, 35) + '…' : p.device),
      el('td', { class: 'num' }, fmtBytes(p.memoryBytes)),
      el('td', { class: 'num' }, fmtNum(p.gemmGflops, 1)),
      el('td', { class: 'num' }, fmtNum(p.tokensPerSecond, 0)),
      el('td', { class: 'h-' + p.health }, p.health),
      el('td', { class: 'num' }, ago(p.lastSeenMs)),
      // reachability, then each hop's path ("relay; 12D3Ko…abcdef hole-punched; 12D3Ko…123456 relayed via 12D3Ko…fedcba")
      el('td', { title: 'reachability; path to each peer it hops with (a relayed one: through which relay)' }, [p.reachability || '–', ...(p.hopPaths || []).map((h) => shortId(h.peerId) + ' ' + h.path + (h.via ? ' via ' + shortId(h.via) : ''))].join('; ')));
    body.appendChild(tr);
  }
}

function renderEvents(state) {
  const ul = $('events');
  ul.replaceChildren();
  const evs = (state.events || []).slice(-50).reverse();
  if (evs.length === 0) { ul.appendChild(el('li', { class: 'empty' }, 'no events yet')); return; }
  for (const e of evs) {
    const li = el('li');
    li.append(el('span', { class: 't' }, new Date(e.timeMs).toLocaleTimeString()), el('span', { class: 'kind' }, e.kind), document.createTextNode(e.message));
    ul.appendChild(li);
  }
}

function render(state) {
  const st = $('state'); st.textContent = state.state; st.className = 'badge st-' + state.state;
  $('run-id').textContent = state.runId; $('model').textContent = state.model;
  const h = state.history || [], last = h[h.length - 1];
  $('step-text').textContent = state.step + ' / ' + state.totalSteps;
  $('progress-bar').style.width = (state.totalSteps > 0 ? Math.min(100, 100 * state.step / state.totalSteps) : 0) + '%';
  // ETA from the mean step time over the last (up to) 20 committed steps
  const recent = h.slice(-21);
  const perStepMs = recent.length >= 2 ? (recent[recent.length - 1].timeMs - recent[0].timeMs) / (recent.length - 1) : NaN;
  const left = state.totalSteps - state.step;
  $('eta').textContent = state.state === 'training' && left > 0 && Number.isFinite(perStepMs) ? ' · ETA ' + fmtDuration(left * perStepMs) : '';
  $('loss-text').textContent = last ? fmtNum(last.loss, 4) : '–';
  $('lr-text').textContent = last ? fmtNum(last.lr, 6) : '–';
  $('tps-text').textContent = last ? fmtNum(last.tokensPerSecond, 0) : '–';
  $('peers-text').textContent = String((state.peers || []).filter((p) => p.health === 'ok' || p.health === 'slow').length);
  $('min-peers').textContent = String(state.minPeers);
  const t = state.totals || { retries: 0, reassignments: 0, bans: 0 };
  $('totals-text').textContent = t.retries + ' / ' + t.reassignments + ' / ' + t.bans;
  const steps = h.map((s) => s.step);
  const loss = h.map((s) => s.loss);
  const smooth = ema(loss, 0.3);
  lineChart($('loss-chart'), [
    { points: steps.map((x, i) => [x, loss[i]]), color: '#5cc8ff', width: 1.2, opacity: 0.55, label: 'loss' },
    { points: steps.map((x, i) => [x, smooth[i]]), color: '#4cc38a', width: 2.2, label: 'smoothed' },
    ...((state.evals || []).length ? [{ points: state.evals.map((e) => [e.step, e.evalLoss]), color: '#ffcb6b', width: 2, label: 'eval_loss' }] : []),
  ], { digits: 2 });
  lineChart($('lr-chart'), [{ points: h.map((s) => [s.step, s.lr]), color: '#c792ea', width: 2, label: 'lr' }], { digits: 5, zeroBase: true });
  lineChart($('tps-chart'), [{ points: h.map((s) => [s.step, s.tokensPerSecond]), color: '#f78c6c', width: 2, label: 'tokens/s' }], { digits: 0, zeroBase: true });
  drawPipeline($('pipeline'), state);
  renderPeers(state);
  renderEvents(state);
  document.body.setAttribute('data-step', String(state.step));
}

async function poll() {
  const conn = $('conn');
  try {
    const r = await fetch('api/state', { cache: 'no-store' });
    if (!r.ok) throw new Error('HTTP ' + r.status);
    render(await r.json());
    conn.textContent = 'live · updated ' + new Date().toLocaleTimeString(); conn.className = '';
  } catch (e) {
    conn.textContent = 'disconnected (' + e.message + ')'; conn.className = 'down';
  } finally {
    setTimeout(poll, pollMs);
  }
}
poll();
</script>
</body>
</html>
`;
