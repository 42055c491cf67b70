// `swarmtune demo`: the flags and Ctrl-C handling of the all-on-one-machine swarm demo (coordinator/demo/run.ts).
import { InvalidArgumentError } from 'commander';
import type { Command } from 'commander';
import { action, EXIT } from '../errors.ts';
import { DEMO_DEFAULTS, runDemo } from '../../coordinator/demo/run.ts';

function intArg(flag: string, min: number) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isInteger(n) || n < min) throw new InvalidArgumentError(`${flag} must be an integer >= ${min}, got "${v}"`);
    return n;
  };
}

export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('run a whole swarm on this machine: a coordinator and N volunteers fine-tune the embedded tiny model, then compare answers before and after')
    .option('--peers <n>', 'volunteer processes', intArg('--peers', 1), DEMO_DEFAULTS.peers)
    .option('--steps <n>', 'optimizer steps', intArg('--steps', 1), DEMO_DEFAULTS.steps)
    .option('--json', 'print the coordinator\'s events (step, plan, ...) as JSON lines, then a demo_finished object')
    .option('--dashboard <port>', 'dashboard port (0 = a free port)', intArg('--dashboard', 0), 0)
    .option('--no-dashboard', 'serve no dashboard')
    .option('--device <device>', 'volunteers\' compute device: auto, cpu, ref or cuda[:N]', DEMO_DEFAULTS.device)
    .option('--learning-rate <lr>', 'peak learning rate', (v: string) => {
      const n = Number(v);
      if (!(n > 0)) throw new InvalidArgumentError(`--learning-rate must be a positive number, got "${v}"`);
      return n;
    }, DEMO_DEFAULTS.learningRate)
    .option('--questions <n>', 'questions answered before/after', intArg('--questions', 0), DEMO_DEFAULTS.questions)
    .option('--work-dir <dir>', 'where the model, logs and adapter go (default: a new temp dir)')
    .option('--timeout <seconds>', 'stop everything and fail after this long', intArg('--timeout', 1), DEMO_DEFAULTS.timeoutMs / 1000)
    .action(action('demo', async (opts: Record<string, unknown>) => {
      // Ctrl-C / SIGTERM: stop every child process group, then exit 130/143
      const abort = new AbortController();
      let signalled: NodeJS.Signals | null = null;
      const onSignal = (sig: NodeJS.Signals) => {
        // a second Ctrl-C means now: exiting runs the demo's exit hook, which SIGKILLs every child group
        if (signalled !== null) process.exit(sig === 'SIGINT' ? EXIT.interrupted : 143);
        signalled = sig;
        process.stderr.write(`\nswarmtune demo: ${sig}, stopping the coordinator and volunteers…\n`);
        abort.abort();
      };
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
      try {
        await runDemo({
          peers: opts.peers as number,
          steps: opts.steps as number,
          json: opts.json === true,
          dashboardPort: opts.dashboard === false ? null : (opts.dashboard as number),
          workDir: (opts.workDir as string | undefined) ?? null,
          device: String(opts.device),
          questions: opts.questions as number,
          learningRate: opts.learningRate as number,
          timeoutMs: (opts.timeout as number) * 1000,
        }, abort.signal);
      } catch (e) {
        if (signalled !== null) return signalled === 'SIGINT' ? EXIT.interrupted : 143;
        throw e;
      } finally {
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
      }
    }));
}
