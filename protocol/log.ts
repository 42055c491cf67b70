// Namespaced loggers (`DEBUG=swarmtune:coordinator:*` style), created once per process and injected.
import { format } from 'node:util';

/** One namespace's log: `log(fmt, ...args)` writes a line when the namespace is enabled;
 *  `log.error` always writes; `child('x')` makes `<namespace>:x`. */
export interface Logger {
  (fmt: string, ...args: unknown[]): void;
  readonly namespace: string;
  readonly enabled: boolean;
  error(fmt: string, ...args: unknown[]): void;
  child(name: string): Logger;
}

export type LogSink = (line: string) => void;

/** Which namespaces a pattern list enables: comma or space separated, `*` matches any run of
 *  characters, a leading `-` excludes (as the `debug` package reads DEBUG). */
export function namespaceFilter(patterns: string | undefined): (ns: string) => boolean {
  const parts = (patterns ?? '').split(/[\s,]+/).filter((p) => p.length > 0);
  const toRe = (p: string) => new RegExp('^' + p.replace(/[.+?^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*') + '$');
  const include = parts.filter((p) => !p.startsWith('-')).map(toRe);
  const exclude = parts.filter((p) => p.startsWith('-')).map((p) => toRe(p.slice(1)));
  return (ns) => include.some((r) => r.test(ns)) && !exclude.some((r) => r.test(ns));
}

export interface LoggerInit {
  /** the DEBUG pattern list; nothing but errors is written without it */
  debug?: string;
  /** where lines go, default stderr */
  sink?: LogSink;
  /** clock for the line prefix, default Date.now */
  now?: () => number;
}

/** The root logger of a process (`swarmtune`); components take `root.child('coordinator')` etc. */
export function createLogger(init: LoggerInit = {}, namespace = 'swarmtune'): Logger {
  const enabledFor = namespaceFilter(init.debug);
  const sink = init.sink ?? ((line: string) => { process.stderr.write(line + '\n'); });
  const now = init.now ?? Date.now;
  const make = (ns: string): Logger => {
    const enabled = enabledFor(ns);
    const write = (fmt: string, args: unknown[]) => sink(`${new Date(now()).toISOString()} ${ns} ${format(fmt, ...args)}`);
    const log = ((fmt: string, ...args: unknown[]) => { if (enabled) write(fmt, args); }) as Logger;
    Object.defineProperty(log, 'namespace', { value: ns });
    Object.defineProperty(log, 'enabled', { value: enabled });
    log.error = (fmt: string, ...args: unknown[]) => write(fmt, args);
    log.child = (name: string) => make(`${ns}:${name}`);
    return log;
  };
  return make(namespace);
}

/** A logger that writes nothing, errors included: the default where none is injected (tests, libraries). */
export const silentLogger: Logger = createLogger({ sink: () => {} });
