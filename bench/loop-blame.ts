// Which code ran during each event-loop stall of a bench child: reads a loop log (bench/loop-watch.ts) and
// the child's --cpu-prof profile, and prints per stall the project functions (deepest frame under the
// repository, then its caller) that most samples of that span were in.
//
//   node bench/loop-blame.ts <loop.log> <profile.cpuprofile> [--min-ms 300]
import { readFileSync } from 'node:fs';
import path from 'node:path';

interface Node { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }
interface Profile { nodes: Node[]; startTime: number; samples: number[]; timeDeltas: number[] }

const ROOT = path.resolve(import.meta.dirname, '..');

export function blame(logText: string, prof: Profile, minMs: number): Array<{ end_us: number; ms: number; top: Array<[string, number]> }> {
  const parent = new Map<number, number>();
  const byId = new Map<number, Node>();
  for (const n of prof.nodes) { byId.set(n.id, n); for (const c of n.children ?? []) parent.set(c, n.id); }
  const label = (n: Node): string => `${n.callFrame.functionName || '(anon)'} ${n.callFrame.url.replace(/^file:\/\//, '').replace(ROOT + '/', '')}:${n.callFrame.lineNumber + 1}`;
  const own = (n: Node): boolean => n.callFrame.url.includes(ROOT) && !n.callFrame.url.includes('node_modules');
  // sample times
  const times: number[] = [];
  let t = prof.startTime;
  for (const d of prof.timeDeltas) { t += d; times.push(t); }
  const blocks = logText.split('\n').map((l) => /^block (\d+) \d+ (\d+)(?: \d+)?$/.exec(l)).filter((m) => m !== null).map((m) => ({ end: Number(m![1]), ms: Number(m![2]) })).filter((b) => b.ms >= minMs);
  return blocks.map((b) => {
    const from = b.end - b.ms * 1000;
    const tally = new Map<string, number>();
    let n = 0;
    for (let i = 0; i < times.length; i++) {
      if (times[i]! < from || times[i]! > b.end) continue;
      n++;
      let id: number | undefined = prof.samples[i]!;
      const leaf = byId.get(id)!;
      const stack: Node[] = [];
      while (id !== undefined) { const x = byId.get(id)!; if (own(x)) stack.push(x); id = parent.get(id); }
      const key = stack.length === 0 ? `[${leaf.callFrame.functionName || '(anon)'}]` : `${label(stack[0]!)}${stack[1] ? ' <- ' + label(stack[1]) : ''}${stack[0] !== leaf ? ` [${leaf.callFrame.functionName}]` : ''}`;
      tally.set(key, (tally.get(key) ?? 0) + 1);
    }
    const top = [...tally].sort((a, c) => c[1] - a[1]).slice(0, 4).map(([k, c]) => [k, Math.round((100 * c) / Math.max(1, n))] as [string, number]);
    return { end_us: b.end, ms: b.ms, top };
  });
}

if (import.meta.main) {
  const [logFile, profFile] = process.argv.slice(2);
  const mi = process.argv.indexOf('--min-ms');
  if (logFile === undefined || profFile === undefined) { process.stderr.write('usage: node bench/loop-blame.ts <loop.log> <profile.cpuprofile> [--min-ms N]\n'); process.exit(2); }
  const minMs = mi > 0 ? Number(process.argv[mi + 1]) : 300;
  for (const b of blame(readFileSync(logFile, 'utf8'), JSON.parse(readFileSync(profFile, 'utf8')) as Profile, minMs)) {
    console.log(`${b.ms} ms stall ending ${b.end_us}: ${b.top.map(([k, p]) => `${p}% ${k}`).join(' | ')}`);
  }
}
