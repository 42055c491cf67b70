// netlab's command runner: ip/tc/nft invocations with a time limit and one-line errors naming the command.
import { execFile, spawnSync } from 'node:child_process';

/** A command of the harness failed: `message` is one line naming the command, its exit status and stderr. */
export class NetlabCommandError extends Error {
  override readonly name = 'NetlabCommandError';
  readonly command: string;
  readonly status: string;
  readonly stderr: string;
  constructor(command: string, status: string, stderr: string) {
    super(`netlab: \`${command}\` failed (${status}): ${stderr.trim().split('\n').join(' | ') || 'no stderr'}`);
    this.command = command; this.status = status; this.stderr = stderr;
  }
}

const DEFAULT_TIMEOUT_MS = 10_000;

function quote(argv: readonly string[]): string {
  return argv.map(a => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

/** Runs argv[0] with argv[1..]; resolves with stdout, rejects with a NetlabCommandError. */
export function sh(argv: readonly string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = execFile(argv[0], argv.slice(1), { timeout: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS, maxBuffer: 16 << 20, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        if (!err) { resolve(stdout); return; }
        const e = err as NodeJS.ErrnoException & { killed?: boolean; code?: number | string; signal?: string };
        const status = e.killed ? `killed after ${opts.timeoutMs ?? DEFAULT_TIMEOUT_MS} ms` : e.signal ? `signal ${e.signal}` : `exit ${e.code}`;
        // ip/tc -batch name the failing line by number: show it
        const n = Number(/Command failed -:(\d+)/.exec(String(stderr))?.[1]);
        const line = n && opts.input !== undefined ? ` [line ${n}: ${opts.input.split('\n')[n - 1]}]` : '';
        reject(new NetlabCommandError(quote(argv) + line, status, String(stderr || e.message)));
      });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}

/** The synchronous twin of sh() for exit handlers (no event loop there); returns stdout, or null on failure. */
export function shSync(argv: readonly string[], opts: { input?: string; timeoutMs?: number } = {}): string | null {
  const r = spawnSync(argv[0], argv.slice(1), { input: opts.input, timeout: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS, encoding: 'utf8', killSignal: 'SIGKILL' });
  return r.status === 0 ? r.stdout : null;
}

export { quote as quoteArgv };
