// The one error path of every command: a thrown error becomes one line `swarmtune <cmd>: <message>` on
// stderr and an exit code from EXIT (the table in docs/operations.md); a stack only with DEBUG set.
import type { Command } from 'commander';
import { knobs } from '../engine/env.ts';

/** Exit codes of every command (docs/operations.md, "Exit codes"). */
export const EXIT = {
  ok: 0,
  /** anything else: a failed run, a bug, an I/O error */
  failed: 1,
  /** bad input: a flag, run.json, the JSONL data, a model or adapter dir swarmtune cannot use */
  usage: 2,
  /** refused: a private run without its token, a banned peer, a join the coordinator rejected */
  refused: 3,
  /** not found: a missing file or directory, a step the run does not have */
  notFound: 4,
  /** network: an address nothing answers on, an address that is not swarmtune, a listen address in use */
  network: 5,
  /** interrupted by Ctrl-C before the work was done (train saves a checkpoint first) */
  interrupted: 130,
} as const;

/** A bad flag value or a missing required input, found by bin/ itself. */
export class UsageError extends Error {
  override name = 'UsageError';
}
/** A file, directory or run step named by the user that does not exist. */
export class NotFoundError extends Error {
  override name = 'NotFoundError';
}
/** An address that cannot be used: nothing answers, it is not swarmtune, or it is in use. */
export class NetworkError extends Error {
  override name = 'NetworkError';
}

/** Errors by stable name: what the user got wrong (or what refused them), never a bug. */
const BY_NAME: Record<string, number> = {
  UsageError: EXIT.usage, InvalidArgumentError: EXIT.usage, CommanderError: EXIT.usage, EnvKnobError: EXIT.usage,
  ConfigError: EXIT.usage, DataError: EXIT.usage, ModelDirError: EXIT.usage, SafetensorsError: EXIT.usage,
  UnsupportedQuantizationError: EXIT.usage, BnbFormatError: EXIT.usage, TokenizerError: EXIT.usage,
  TemplateError: EXIT.usage, ChatSpanError: EXIT.usage, AdapterError: EXIT.usage, MergeError: EXIT.usage, GenerationConfigError: EXIT.usage,
  BackendUnavailableError: EXIT.usage, ScenarioError: EXIT.usage,
  AuthError: EXIT.refused, CapacityError: EXIT.refused, JoinRejectedError: EXIT.refused,
  RunMismatchError: EXIT.refused, ResumeError: EXIT.refused,
  NotFoundError: EXIT.notFound, StepNotFoundError: EXIT.notFound,
  NetworkError: EXIT.network, EncryptionFailedError: EXIT.network, UnsupportedProtocolError: EXIT.network,
  DialError: EXIT.network, NoValidAddressesError: EXIT.network, UnsupportedListenAddressesError: EXIT.network,
  ConnectionFailedError: EXIT.network, UnexpectedPeerError: EXIT.network,
};

/** errno codes of a connection that never reached a coordinator */
const NETWORK_CODES: Record<string, string> = {
  ECONNREFUSED: 'connection refused: nothing listens there (is the coordinator running, and is this its address?)',
  EHOSTUNREACH: 'host unreachable', ENETUNREACH: 'network unreachable', ETIMEDOUT: 'connection timed out',
  ECONNRESET: 'connection reset by the other side', EADDRNOTAVAIL: 'address not available on this machine',
  ENOTFOUND: 'no such host',
};

/** Built-in JS errors are bugs: their name stays in the line so a report says what broke. */
const BUG_NAMES = new Set(['TypeError', 'RangeError', 'ReferenceError', 'SyntaxError', 'EvalError', 'URIError']);

/** What the user was doing, for messages that need it: the address the command dials. */
export interface ErrorContext { address?: string }

function errnoCode(e: unknown): string | undefined {
  for (let x = e as { code?: unknown; cause?: unknown; errors?: unknown[] } | undefined, depth = 0; x !== undefined && x !== null && depth < 4; depth++) {
    if (typeof x.code === 'string' && /^E[A-Z]+$/.test(x.code)) return x.code;
    if (Array.isArray(x.errors) && x.errors.length > 0) x = x.errors[0] as typeof x;
    else x = x.cause as typeof x;
  }
  return undefined;
}

/** The exit code and the one line (without the `swarmtune <cmd>: ` prefix) for an error. */
export function describeError(err: unknown, ctx: ErrorContext = {}): { code: number; message: string } {
  const e = err instanceof Error ? err : new Error(String(err));
  const name = e.name;
  const msg = e.message.trim() === '' ? name : e.message;
  const where = ctx.address ?? 'this address';
  if (name === 'UnsupportedListenAddressesError') {
    // libp2p's message advises its own `transportManager.faultTolerance` setting: say what happened instead
    const m = /^\s*(\/\S+): (?:\w*Error: )?(.*)$/m.exec(msg);
    const inUse = /EADDRINUSE/.test(msg);
    const addr = m?.[1] ?? '';
    return { code: EXIT.network, message: inUse ? `--listen ${addr}: address already in use (another process listens there: stop it or choose another port)`
      : `--listen ${addr}: cannot listen there (${(m?.[2] ?? msg).replace(/^listen /, '')})` };
  }
  if (name === 'EncryptionFailedError' || name === 'UnsupportedProtocolError' || name === 'UnexpectedPeerError') {
    return { code: EXIT.network, message: `${where} is not a swarmtune coordinator (${name === 'EncryptionFailedError' ? 'the encrypted handshake failed' : 'it does not speak the swarmtune protocol'}: ${msg})` };
  }
  const errno = errnoCode(e);
  if (errno === 'ENOENT') return { code: EXIT.notFound, message: msg };
  if (errno !== undefined && NETWORK_CODES[errno] !== undefined && (BY_NAME[name] === undefined || BY_NAME[name] === EXIT.network || name === 'Error')) {
    return { code: EXIT.network, message: `cannot reach ${where}: ${NETWORK_CODES[errno]}` };
  }
  const code = BY_NAME[name];
  if (code !== undefined) {
    // a data or model error that is really a missing file
    if (code === EXIT.usage && /\bENOENT\b|does not exist/.test(msg)) return { code: EXIT.notFound, message: msg };
    return { code, message: msg };
  }
  if (name === 'TimeoutError' && ctx.address !== undefined) return { code: EXIT.network, message: `cannot reach ${where}: ${msg}` };
  return { code: EXIT.failed, message: BUG_NAMES.has(name) ? `${name}: ${msg}` : msg };
}

/** Print the one line (and, with DEBUG set, the stack) and return the exit code. */
export function reportError(command: string, err: unknown, ctx: ErrorContext = {}): number {
  const { code, message } = describeError(err, ctx);
  // a message that already names the command ("pull: this run is private…") says it once
  const line = message.startsWith(`${command}: `) ? message.slice(command.length + 2) : message;
  process.stderr.write(`swarmtune ${command}: ${line}\n`);
  let debug: string | undefined;
  try { debug = knobs().debug; } catch { debug = undefined; } // a bad knob is the error being reported
  if (debug !== undefined && err instanceof Error && err.stack !== undefined) process.stderr.write(`${err.stack}\n`);
  return code;
}

/** Wrap a command's action: it resolves with an exit code (or nothing: 0); whatever it throws goes
 *  through reportError. `context` names the address the command dials, from its arguments. */
export function action<A extends unknown[]>(command: string, fn: (...args: A) => Promise<number | void>,
  context: (...args: A) => ErrorContext = () => ({})): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      const code = await fn(...args);
      if (typeof code === 'number') process.exitCode = code;
    } catch (e) {
      process.exitCode = reportError(command, e, context(...args));
    }
  };
}

/** commander's own usage errors (unknown option, missing required option, bad argument): the same
 *  one-line form and exit 2; help and version exit 0. Applied to the program before commands are added
 *  (commander copies these settings into every subcommand). */
export function configureUsageErrors(program: Command): void {
  program.exitOverride((err) => {
    if (err.code === 'commander.helpDisplayed' || err.code === 'commander.help' || err.code === 'commander.version') process.exit(0);
    process.exit(EXIT.usage);
  });
}

/** commander's error text as one line: its "(Did you mean …?)" hint joins the line it follows. */
function usageLine(s: string, prefix: string): string {
  return s.replace(/^error: /, prefix).replace(/\s*\n\((Did you mean [^)]*)\)/, (_, hint: string) => ` (${hint.replace(/^D/, 'd')})`).trimEnd() + '\n';
}

/** After every command is registered: commander's error lines say which command, as ours do. */
export function prefixUsageErrors(program: Command): void {
  program.configureOutput({ outputError: (s, write) => write(usageLine(s, 'swarmtune: ')) });
  for (const cmd of program.commands) {
    cmd.configureOutput({ outputError: (s, write) => write(usageLine(s, `swarmtune ${cmd.name()}: `)) });
  }
}
