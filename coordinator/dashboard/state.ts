// The coordinator's live state as the dashboard shows it (GET /api/state returns this object).

export type PeerHealth = 'ok' | 'slow' | 'dead' | 'banned' | 'spare';

export interface DashboardPeer {
  peerId: string;
  stageIndex: number | null;
  layerStart: number | null;
  layerEnd: number | null;
  /** "cpu: AMD EPYC …" or "cuda:0 NVIDIA H100" */
  device: string;
  memoryBytes: number;
  gemmGflops: number;
  tokensPerSecond: number;
  health: PeerHealth;
  /** ms since the epoch of the last answered heartbeat */
  lastSeenMs: number;
  /** NAT traversal on: 'relay' when the peer holds a reservation on the coordinator's relay */
  reachability?: 'public' | 'relay';
  /** NAT traversal on: the path of its connection to each peer it exchanges hops with */
  hopPaths?: { peerId: string; path: 'direct' | 'hole-punched' | 'relayed'; via?: string }[];
}

export interface DashboardStage {
  index: number;
  layerStart: number;
  layerEnd: number;
  /** replica peer ids in aggregation order */
  replicas: string[];
}

export interface DashboardStep {
  step: number;
  loss: number;
  lr: number;
  gradNorm: number;
  tokensPerSecond: number;
  /** ms since the epoch when the step was committed */
  timeMs: number;
}

export interface DashboardEvent {
  timeMs: number;
  kind: 'join' | 'plan' | 'retry' | 'drop' | 'ban' | 'reassign' | 'checkpoint' | 'finish' | 'error';
  message: string;
}

export interface DashboardState {
  runId: string;
  state: 'waiting' | 'training' | 'finished' | 'failed';
  model: string;
  /** committed optimizer steps */
  step: number;
  totalSteps: number;
  minPeers: number;
  peers: DashboardPeer[];
  stages: DashboardStage[];
  history: DashboardStep[];
  totals: { retries: number; reassignments: number; bans: number; tokens: number };
  /** most recent last, bounded */
  events: DashboardEvent[];
  /** evaluations (eval_strategy), oldest first */
  evals?: Array<{ step: number; evalLoss: number }>;
}
