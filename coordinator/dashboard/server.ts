// The live dashboard's HTTP server: GET / serves the self-contained page, GET /api/state the coordinator's DashboardState.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { DashboardState } from './state.ts';
import { DASHBOARD_HTML } from './page.ts';

export interface DashboardOptions {
  /** 0 picks a free port (the returned url names it) */
  port: number;
  /** default 127.0.0.1: the dashboard has no authentication, so it is local unless asked otherwise */
  host?: string;
  getState: () => DashboardState;
}

export interface DashboardHandle {
  url: string;
  close(): Promise<void>;
}

// The page needs nothing from outside: this policy makes any accidental external asset fail loudly in
// the browser, and keeps a hostile peer id or event text from loading anything even if it were rendered.
const CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'";

function send(res: ServerResponse, status: number, type: string, body: string, head: boolean): void {
  res.writeHead(status, {
    'content-type': type,
    'content-length': Buffer.byteLength(body),
    'cache-control': 'no-store',
    'x-content-type-options': 'nosniff',
    'content-security-policy': CSP,
  });
  res.end(head ? undefined : body);
}

function handle(req: IncomingMessage, res: ServerResponse, getState: () => DashboardState): void {
  const head = req.method === 'HEAD';
  if (req.method !== 'GET' && !head) {
    res.setHeader('allow', 'GET, HEAD');
    send(res, 405, 'application/json', JSON.stringify({ error: `method ${req.method} not allowed` }), false);
    return;
  }
  const path = new URL(req.url ?? '/', 'http://localhost').pathname;
  if (path === '/' || path === '/index.html') {
    send(res, 200, 'text/html; charset=utf-8', DASHBOARD_HTML, head);
  } else if (path === '/api/state') {
    let body: string;
    try {
      body = JSON.stringify(getState());
    } catch (e) {
      send(res, 500, 'application/json', JSON.stringify({ error: `getState failed: ${(e as Error).message}` }), head);
      return;
    }
    send(res, 200, 'application/json', body, head);
  } else {
    send(res, 404, 'application/json', JSON.stringify({ error: `no such path ${path}` }), head);
  }
}

/** Start the dashboard. Resolves once listening; rejects (naming host:port) when the port is taken. */
export async function startDashboard(opts: DashboardOptions): Promise<DashboardHandle> {
  const host = opts.host ?? '127.0.0.1';
  const server = createServer((req, res) => handle(req, res, opts.getState));
  // A browser tab keeps connections alive; without this close() would wait for it to go away.
  server.keepAliveTimeout = 2000;
  await new Promise<void>((resolve, reject) => {
    const onError = (e: Error) => reject(new Error(`dashboard: cannot listen on ${host}:${opts.port}: ${e.message}`, { cause: e }));
    server.once('error', onError);
    server.listen(opts.port, host, () => {
      server.off('error', onError);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;
  const urlHost = host.includes(':') ? `[${host}]` : host;
  return {
    url: `http://${urlHost}:${port}/`,
    close: () => new Promise<void>((resolve, reject) => {
      server.close((e) => (e ? reject(e) : resolve()));
      server.closeAllConnections();
    }),
  };
}
