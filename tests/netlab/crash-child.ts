// A process that builds a small lab and then dies in one way, for tests/netlab.test.ts's clean-up checks.
// Usage: node tests/netlab/crash-child.ts throw|hang|badcc
//   throw, hang: print one JSON line {prefix, pids} (the lab's namespaces' processes, its delay device
//   included), then
//     throw: an uncaught exception (the exit handler must tear the lab down);
//     hang:  wait (at most 60 s) to be killed: SIGTERM must tear down, SIGKILL leaves it to sweepLeftovers();
//   badcc: $CC is a fake compiler whose "delay device" fails at start, after the namespaces and links exist:
//     prints {error, left} (createLab's error and the namespaces of this process that remain) and exits 0.
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createLab, FAMILY, listNamespaces } from './lab.ts';

const mode = process.argv[2];
if (mode !== 'throw' && mode !== 'hang' && mode !== 'badcc') { process.stderr.write('usage: crash-child.ts throw|hang|badcc\n'); process.exit(2); }
const spec = { hosts: ['a', 'b'], links: [{ a: 'a', b: 'b', rateMbit: 50, delayMs: 5 }] };

if (mode === 'badcc') {
  const dir = mkdtempSync(path.join(tmpdir(), 'netlab-badcc-'));
  const cc = path.join(dir, 'cc');
  // --version: a version of its own (so its build is cached apart); -o OUT SRC: OUT fails when run
  writeFileSync(cc, `#!/bin/sh\nif [ "$1" = --version ]; then echo "netlab fake cc"; exit 0; fi\n` +
    `while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out="$2"; fi; shift; done\n` +
    `printf '#!/bin/sh\\necho "fake delay device: cannot open the wire" >&2\\nexit 2\\n' > "$out"; chmod +x "$out"\n`);
  chmodSync(cc, 0o755);
  process.env.CC = cc;
  try {
    await createLab(spec);
    process.stdout.write(JSON.stringify({ error: null, left: [] }) + '\n');
  } catch (e) {
    const mine = FAMILY + process.pid.toString(36).padStart(5, '0');
    process.stdout.write(JSON.stringify({ error: (e as Error).message, left: listNamespaces().filter(n => n.startsWith(mine)) }) + '\n');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  process.exit(0);
}

const lab = await createLab(spec);
const sleeper = lab.spawn('b', 'sleep', ['60']);
for (let i = 0; i < 100 && !lab.pids().includes(sleeper.pid!); i++) await new Promise(r => setTimeout(r, 20));  // until it is in b
process.stdout.write(JSON.stringify({ prefix: lab.prefix, pids: lab.pids() }) + '\n');
if (mode === 'throw') throw new Error('crash-child: deliberate uncaught exception');
setTimeout(() => process.exit(3), 60_000);
