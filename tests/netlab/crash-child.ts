// A process that builds a small lab and then dies in one way, for tests/netlab.test.ts's clean-up checks.
// Usage: node tests/netlab/crash-child.ts throw|hang
//   prints one JSON line {prefix, pids} (the lab's namespaces' processes, its delay device included), then
//   throw: an uncaught exception (the exit handler must tear the lab down);
//   hang:  waits (at most 60 s) to be killed: SIGTERM must tear down, SIGKILL leaves it to sweepLeftovers().
import { createLab } from './lab.ts';

const mode = process.argv[2];
if (mode !== 'throw' && mode !== 'hang') { process.stderr.write('usage: crash-child.ts throw|hang\n'); process.exit(2); }
const lab = await createLab({ hosts: ['a', 'b'], links: [{ a: 'a', b: 'b', rateMbit: 50, delayMs: 5 }] });
const sleeper = lab.spawn('b', 'sleep', ['60']);
for (let i = 0; i < 100 && !lab.pids().includes(sleeper.pid!); i++) await new Promise(r => setTimeout(r, 20));  // until it is in b
process.stdout.write(JSON.stringify({ prefix: lab.prefix, pids: lab.pids() }) + '\n');
if (mode === 'throw') throw new Error('crash-child: deliberate uncaught exception');
setTimeout(() => process.exit(3), 60_000);
