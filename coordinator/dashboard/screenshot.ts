// Refreshes docs/img/dashboard.png from a real `swarmtune demo` run (headless Chromium at /usr/bin/chromium).
// Run: node coordinator/dashboard/screenshot.ts [out.png] [atStep]   (about a minute on 2 cores)
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

if (import.meta.main) {
  const root = fileURLToPath(new URL('../..', import.meta.url));
  const out = path.resolve(process.argv[2] ?? path.join(root, 'docs/img/dashboard.png'));
  const atStep = Number(process.argv[3] ?? 120);
  const work = mkdtempSync(path.join(tmpdir(), 'swarmtune-shot-'));
  const demo = spawn(process.execPath, [path.join(root, 'bin/swarmtune.ts'), 'demo', '--json', '--work-dir', work], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const url = await new Promise<string>((resolve, reject) => {
      let dashboard = '';
      demo.once('exit', (code) => reject(new Error(`demo exited (code ${code}) before step ${atStep}`)));
      createInterface({ input: demo.stdout! }).on('line', (line) => {
        const e = JSON.parse(line) as { event: string; url?: string; step?: number };
        if (e.event === 'dashboard') dashboard = e.url!;
        if (e.event === 'step' && e.step === atStep) resolve(dashboard);
      });
    });
    const { chromium } = await import('playwright-core');
    const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run'] });
    try {
      const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
      await page.goto(url);
      await page.waitForFunction(() => Number((globalThis as any).document.body.getAttribute('data-step')) > 0);
      await page.screenshot({ path: out, fullPage: true });
      console.log(`wrote ${out}`);
    } finally {
      await browser.close();
    }
  } finally {
    demo.kill('SIGTERM');
    await new Promise((r) => (demo.exitCode !== null ? r(null) : demo.once('exit', r)));
    rmSync(work, { recursive: true, force: true });
  }
}
