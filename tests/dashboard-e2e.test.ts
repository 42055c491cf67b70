// End-to-end test of the dashboard: the real HTTP server, and the real page in headless Chromium polling a
// fake, changing DashboardState. Chromium comes from Debian (`apt-get install -y chromium`); without
// /usr/bin/chromium the browser test is skipped with a message saying so (the HTTP tests still run).
// The page is saved to $DASHBOARD_SCREENSHOT (default: a temp file); docs/img/dashboard.png comes from a real demo run
// via coordinator/dashboard/screenshot.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startDashboard } from '../coordinator/dashboard/server.ts';
import type { DashboardState, DashboardStep } from '../coordinator/dashboard/state.ts';

const CHROMIUM = '/usr/bin/chromium';

/** A small 2-stage run (stage 0 with two replicas) whose history grows when advance() is called. */
class FakeRun {
  steps: DashboardStep[] = [];
  readonly t0 = Date.now() - 120_000;
  constructor(initialSteps: number) { this.advance(initialSteps); }
  lastAdvanceMs = 0;
  advance(n: number): void {
    this.lastAdvanceMs = Date.now();
    for (let i = 0; i < n; i++) {
      const step = this.steps.length + 1;
      // loss falling from ~7 with a little deterministic wiggle; cosine LR with 5 warmup steps over 60
      const loss = 0.4 + 6.5 * Math.exp(-step / 12) + 0.15 * Math.sin(step * 1.7);
      const lr = step < 5 ? 3e-3 * step / 5 : 3e-3 * 0.5 * (1 + Math.cos(Math.PI * (step - 5) / 55));
      this.steps.push({ step, loss, lr, gradNorm: 1 / step, tokensPerSecond: 1800 + 40 * Math.sin(step), timeMs: this.t0 + step * 2000 });
    }
  }
  state(): DashboardState {
    const now = this.lastAdvanceMs;
    const peer = (peerId: string, stageIndex: number, layerStart: number, layerEnd: number, device: string, tps: number, health: 'ok' | 'slow') => ({
      peerId, stageIndex, layerStart, layerEnd, device, memoryBytes: 16 * 2 ** 30, gemmGflops: 41.5, tokensPerSecond: tps, health, lastSeenMs: now - 800,
    });
    return {
      runId: 'run-7f3a9c',
      state: 'training',
      model: 'swarmtune-tiny (Llama, 4 layers)',
      step: this.steps.length,
      totalSteps: 60,
      minPeers: 3,
      peers: [
        peer('12D3KooWAlphaPeer1111111111111111111111', 0, 0, 2, 'cpu: AMD EPYC 9654 (2 threads)', 1020, 'ok'),
        peer('12D3KooWBravoPeer2222222222222222222222', 0, 0, 2, 'cuda:0 NVIDIA H200', 2480, 'ok'),
        // device text from a peer is untrusted: it must show up as text, never as markup
        peer('12D3KooWCharliePeer33333333333333333333', 1, 2, 4, '<img src=x onerror="document.title=1">', 860, 'slow'),
      ],
      stages: [
        { index: 0, layerStart: 0, layerEnd: 2, replicas: ['12D3KooWAlphaPeer1111111111111111111111', '12D3KooWBravoPeer2222222222222222222222'] },
        { index: 1, layerStart: 2, layerEnd: 4, replicas: ['12D3KooWCharliePeer33333333333333333333'] },
      ],
      history: this.steps,
      // an evaluation every 10 steps (eval_strategy steps)
      evals: this.steps.filter((x) => x.step % 10 === 0).map((x) => ({ step: x.step, evalLoss: x.loss + 0.3 })),
      totals: { retries: 2, reassignments: 1, bans: 0, tokens: this.steps.length * 4096 },
      events: [
        { timeMs: this.t0, kind: 'plan', message: '2 stages: layers 0–1, 2–3' },
        { timeMs: this.t0 + 5000, kind: 'retry', message: 'step 3 micro-batch 1 retried on another route' },
        { timeMs: this.t0 + 9000, kind: 'checkpoint', message: 'optimizer state saved at step 10' },
      ],
    };
  }
}

test('dashboard HTTP: state JSON, self-contained page, 404/405, port in use', async () => {
  const run = new FakeRun(3);
  const d = await startDashboard({ port: 0, getState: () => run.state() });
  try {
    assert.match(d.url, /^http:\/\/127\.0\.0\.1:\d+\/$/);
    const st = await fetch(new URL('api/state', d.url));
    assert.equal(st.status, 200);
    assert.match(st.headers.get('content-type') ?? '', /application\/json/);
    assert.deepEqual(await st.json(), JSON.parse(JSON.stringify(run.state())));
    run.advance(2);
    assert.equal(((await (await fetch(new URL('api/state', d.url))).json()) as DashboardState).step, 5, 'state is read on every request');

    const page = await fetch(d.url);
    assert.equal(page.status, 200);
    const html = await page.text();
    assert.match(html, /<title>swarmtune dashboard<\/title>/);
    // self-contained: no external scripts, styles or images (the SVG namespace URI is not a fetch)
    assert.deepEqual(html.replaceAll('http://www.w3.org/2000/svg', '').match(/(https?:)?\/\/[a-z0-9.-]+\.[a-z]{2,}/gi), null);
    assert.doesNotMatch(html, /<(script|link|img)[^>]+(src|href)=/i);
    assert.match(page.headers.get('content-security-policy') ?? '', /default-src 'none'/);

    assert.equal((await fetch(new URL('nope', d.url))).status, 404);
    assert.equal((await fetch(new URL('api/state', d.url), { method: 'POST' })).status, 405);
    const port = Number(new URL(d.url).port);
    await assert.rejects(startDashboard({ port, getState: () => run.state() }), new RegExp(`127\\.0\\.0\\.1:${port}`));
  } finally {
    await d.close();
  }
  // a getState that throws gives a 500 naming the failure, and the server keeps serving
  const bad = await startDashboard({ port: 0, getState: () => { throw new Error('coordinator gone'); } });
  try {
    const r = await fetch(new URL('api/state', bad.url));
    assert.equal(r.status, 500);
    assert.match(((await r.json()) as { error: string }).error, /coordinator gone/);
    assert.equal((await fetch(bad.url)).status, 200);
  } finally {
    await bad.close();
  }
});

test('dashboard page in headless Chromium shows peers, pipeline and live-updating curves', { skip: existsSync(CHROMIUM) ? false : `${CHROMIUM} not installed (apt-get install -y chromium)` }, async () => {
  const { chromium } = await import('playwright-core');
  const run = new FakeRun(20);
  const d = await startDashboard({ port: 0, getState: () => run.state() });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
    const origin = new URL(d.url).origin;
    const foreign: string[] = [];
    page.on('request', (r) => { if (!r.url().startsWith(origin)) foreign.push(r.url()); });
    const pageErrors: string[] = [];
    page.on('pageerror', (e) => pageErrors.push(e.message));
    // 150 ms polling keeps the test short; the default is 1 s
    await page.goto(`${d.url}?pollMs=150`);

    // page-side code reaches the DOM through globalThis: the project's TypeScript config has no DOM types,
    // and the page's CSP forbids string evaluation
    await page.waitForFunction(() => (globalThis as any).document.querySelectorAll('#peers-body tr[data-peer]').length === 3);
    const peerRows = await page.$$eval('#peers-body tr[data-peer]', (rows) => rows.map((r) => (r as unknown as { innerText: string }).innerText));
    assert.ok(peerRows.some((t) => t.includes('NVIDIA H200') && t.includes('2480')), peerRows.join('\n'));
    assert.ok(peerRows.some((t) => t.includes('<img src=x') && t.includes('slow')), 'untrusted device text shown literally');
    assert.equal(await page.$$eval('#peers-body img', (x) => x.length), 0);
    assert.notEqual(await page.title(), '1');

    assert.equal(await page.$$eval('#pipeline g[data-stage]', (g) => g.length), 2);
    const stage0 = await page.$eval('#pipeline g[data-stage="0"]', (g) => g.textContent ?? '');
    assert.match(stage0, /layers 0–1/);
    assert.match(stage0, /12D3Ko…111111/);
    assert.match(stage0, /12D3Ko…222222/);
    assert.equal(await page.textContent('#step-text'), '20 / 60');

    const lossPoints = () => page.$eval('#loss-chart polyline[data-series="loss"]', (p) => p.getAttribute('points') ?? '');
    const before = await lossPoints();
    assert.equal(before.split(' ').length, 20);
    run.advance(15);
    await page.waitForFunction(() => (globalThis as any).document.querySelector('#loss-chart')?.getAttribute('data-n') === '35');
    const after = await lossPoints();
    assert.equal(after.split(' ').length, 35);
    assert.notEqual(after, before);
    assert.equal(await page.$eval('#lr-chart', (s) => s.getAttribute('data-n')), '35');
    // the eval_loss series: one vertex per evaluation (steps 10, 20, 30)
    const evalPoints = await page.$eval('#loss-chart polyline[data-series="eval_loss"]', (p) => p.getAttribute('points') ?? '');
    assert.equal(evalPoints.split(' ').length, 3);
    assert.equal(await page.textContent('#step-text'), '35 / 60');
    // fake steps are 2 s apart: 25 steps left ⇒ 50 s
    assert.equal(await page.textContent('#eta'), ' · ETA 50 s');
    // the last plotted loss is the newest step's (its y is lower on screen = larger number than the first point's y)
    const ys = after.split(' ').map((p: string) => Number(p.split(',')[1]));
    assert.ok(ys[ys.length - 1] > ys[0], 'falling loss is drawn falling');

    await page.screenshot({ path: process.env.DASHBOARD_SCREENSHOT ?? join(tmpdir(), 'swarmtune-dashboard.png'), fullPage: true });

    // a long run: every step counts (data-n) but the line is thinned to ~1000 vertices, newest kept
    run.advance(2965);
    await page.waitForFunction(() => (globalThis as any).document.querySelector('#loss-chart')?.getAttribute('data-n') === '3000');
    const long = (await lossPoints()).split(' ');
    assert.ok(long.length <= 1001 && long.length >= 900, `${long.length} vertices`);

    assert.deepEqual(foreign, [], 'the page fetched nothing outside the dashboard');
    assert.deepEqual(pageErrors, []);
  } finally {
    await browser.close();
    await d.close();
  }
});
