// What the run has done and is doing, for status requests and the dashboard: state, committed step, history, totals, events.
import type { PeerStatus, StatusResponse } from '../protocol/messages.ts';
import type { DashboardEvent, DashboardState } from './dashboard/state.ts';
import type { StageRange } from './planner.ts';
import type { StepRecord } from './store.ts';

/** One JSON event of the run (`launch --json` prints each as a line; tests parse them). */
export type RunEvent = Record<string, unknown> & { event: string };

export interface RunStatusInit {
  runId: string;
  modelName: string;
  totalSteps: number;
  minPeers: number;
  /** the committed step the run starts from (0, or the step a restarted coordinator resumes) */
  step: number;
  eventHistory: number;
  emit: (e: RunEvent) => void;
  /** the human-readable log (launch writes it to stderr) */
  log: (msg: string) => void;
  /** the run's stored config in one line (coordinator/identity.ts describeRun), for status */
  runConfig?: string;
}

/** The stages and peers as the registry and the plan hold them now. */
export interface RunView {
  stages: readonly StageRange[];
  replicas: readonly (readonly string[])[];
  peers: PeerStatus[];
}

export class RunStatus {
  state: DashboardState['state'] = 'waiting';
  /** committed optimizer steps */
  step: number;
  readonly history: StepRecord[] = [];
  readonly totals = { retries: 0, reassignments: 0, bans: 0, tokens: 0 };
  /** why the run is stalled right now (a stage without a peer), for status */
  waitingFor: string | null = null;
  private readonly events: DashboardEvent[] = [];
  private readonly o: RunStatusInit;

  constructor(o: RunStatusInit) {
    this.o = o;
    this.step = o.step;
  }

  /** Something an operator should see: the dashboard's event list and the log. */
  event(kind: DashboardEvent['kind'], message: string): void {
    this.events.push({ timeMs: Date.now(), kind, message });
    if (this.events.length > this.o.eventHistory) this.events.shift();
    this.o.log(message);
  }

  /** A line for the log only. */
  note(message: string): void { this.o.log(message); }

  emit(e: RunEvent): void { this.o.emit(e); }

  /** A step is committed (and durable): it counts from now on. */
  committed(rec: StepRecord, tokens: number): void {
    this.step = rec.step;
    this.totals.tokens += tokens;
    this.history.push(rec);
  }

  response(view: RunView): StatusResponse {
    const last = this.history[this.history.length - 1];
    return {
      runId: this.o.runId, state: this.state, step: this.step, totalSteps: this.o.totalSteps,
      loss: last?.loss ?? null, lr: last?.lr ?? null, tokensPerSecond: last?.tokensPerSecond ?? null,
      numStages: view.stages.length,
      peers: view.peers,
      committedSteps: this.history.map((h) => h.step),
      retries: this.totals.retries, reassignments: this.totals.reassignments, bans: this.totals.bans, waitingFor: this.waitingFor,
      ...(this.o.runConfig !== undefined ? { runConfig: this.o.runConfig } : {}),
    };
  }

  dashboard(view: RunView): DashboardState {
    return {
      runId: this.o.runId, state: this.state, model: this.o.modelName, step: this.step, totalSteps: this.o.totalSteps,
      minPeers: this.o.minPeers,
      peers: view.peers.map(({ microBatches: _mb, ...p }) => ({ ...p })),
      stages: view.stages.map((s, i) => ({ index: i, ...s, replicas: [...view.replicas[i]!] })),
      history: this.history.map((h) => ({ step: h.step, loss: h.loss, lr: h.lr, gradNorm: h.gradNorm, tokensPerSecond: h.tokensPerSecond, timeMs: h.timeMs })),
      totals: { ...this.totals },
      events: [...this.events],
    };
  }
}
