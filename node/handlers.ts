// The volunteer's protocol handlers, dispatched from one table: each handler runs under its deadline,
// checks who sent it and what state the session is in, and delegates (serve() logs one line per request).
import { serve } from '../protocol/net.ts';
import type { Handler, HandlerContext, SwarmNode } from '../protocol/net.ts';
import type { BlobStore } from '../protocol/blobs.ts';
import { SchemaError, TimeoutError } from '../protocol/errors.ts';
import type { Logger } from '../protocol/log.ts';
import type { VolunteerProto } from './constants.ts';
import type { VolunteerSession } from './session.ts';

export type HandlerTable = { readonly [P in VolunteerProto]: Handler<P> };

/** Every message a volunteer answers. Stage control, heartbeats and finish come only from the
 *  coordinator; hop streams (not in this table: protocol/hop.ts, registered by the session) only
 *  from the peers the coordinator's current route names; verified blobs go to whoever the run allows. */
export function volunteerHandlers(session: VolunteerSession, blobs: BlobStore): HandlerTable {
  return {
    weights: async (req, ctx) => {
      session.checkBlobAccess(ctx.peerId, req.token);
      return blobs.serveChunk(req);
    },
    heartbeat: async (req, ctx) => {
      session.checkCoordinator('heartbeat', ctx.peerId);
      return session.heartbeat(req.periodMs);
    },
    microbatch: async (req, ctx) => {
      session.checkCoordinator('microbatch', ctx.peerId);
      return session.microBatch(req, { signal: ctx.signal });
    },
    commit: async (req, ctx) => {
      session.checkCoordinator('commit', ctx.peerId);
      session.stageHost().commit(req);
      return { ok: true };
    },
    recall: async (req, ctx) => {
      session.checkCoordinator('recall', ctx.peerId);
      return session.recall(req, { signal: ctx.signal });
    },
    aggregate: async (req, ctx) => {
      session.checkCoordinator('aggregate', ctx.peerId);
      return session.stageHost().aggregate(req, { signal: ctx.signal });
    },
    adapter: async (req, ctx) => {
      session.checkCoordinator('adapter', ctx.peerId);
      return session.stageHost().adapter(req);
    },
    optimizer: async (req, ctx) => {
      session.checkCoordinator('optimizer', ctx.peerId);
      return session.stageHost().optimizerChunk(req, { signal: ctx.signal });
    },
    finish: async (req, ctx) => {
      session.checkCoordinator('finish', ctx.peerId);
      session.finish(req);
      return { ok: true };
    },
  };
}

/** Run the table's handler for `proto`; a message the table has no handler for is a SchemaError. */
export async function dispatch(table: HandlerTable, proto: string, req: unknown, ctx: HandlerContext): Promise<unknown> {
  if (!Object.hasOwn(table, proto)) throw new SchemaError(`unknown message ${proto}: a volunteer answers ${Object.keys(table).join(', ')}`);
  return (table[proto as VolunteerProto] as Handler<VolunteerProto>)(req as never, ctx);
}

/** `ctx` with a signal that also aborts when `timeoutMs` runs out. */
async function withDeadline<T>(proto: string, timeoutMs: number, ctx: HandlerContext, run: (ctx: HandlerContext) => Promise<T>): Promise<T> {
  const deadline = new AbortController();
  const timer = setTimeout(() => deadline.abort(new TimeoutError(`${proto}: not answered within ${timeoutMs} ms`)), timeoutMs);
  timer.unref();
  try {
    return await run({ ...ctx, signal: AbortSignal.any([ctx.signal, deadline.signal]) });
  } finally {
    clearTimeout(timer);
  }
}

export interface ServeTableOptions {
  /** each protocol's deadline */
  timeoutsMs: Readonly<Record<VolunteerProto, number>>;
  /** one line per request served (swarmtune:node:rpc) */
  log?: Logger;
  /** the volunteer is leaving: every running handler's signal aborts */
  signal?: AbortSignal;
}

/** Serve every protocol of the table on `node`. */
export async function serveTable(node: SwarmNode, table: HandlerTable, opts: ServeTableOptions): Promise<void> {
  for (const proto of Object.keys(table) as VolunteerProto[]) {
    await serve(node, proto, (req, ctx) => withDeadline(proto, opts.timeoutsMs[proto], ctx, (c) => dispatch(table, proto, req, c)) as never,
      { log: opts.log, signal: opts.signal });
  }
}
