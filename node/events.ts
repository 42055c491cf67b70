// What a volunteer tells its user: one event per line, a JSON object on stdout (--json) or a
// `[swarmtune join] …` sentence on stderr; the same objects go to an optional listener (tests).
// Stage numbers are 0-based here as everywhere else (status, launch, the dashboard).
import type { BlobEvent } from '../protocol/blobs.ts';
import type { Assignment } from '../protocol/messages.ts';

export type EventListener = (e: Record<string, unknown>) => void;

/** What a serving stage has done so far (StageHost's counters), for progress lines. */
export interface StageProgress {
  stage: number;
  layerStart: number;
  layerEnd: number;
  /** the optimizer step being trained, of totalSteps */
  step: number;
  totalSteps: number;
  /** micro-batches whose backward this stage completed */
  microBatches: number;
  /** tokens/s through this stage's forward and backward compute */
  tokensPerSecond: number;
}

export class VolunteerEvents {
  private readonly json: boolean;
  private readonly listener: EventListener | undefined;

  constructor(json: boolean, listener?: EventListener) {
    this.json = json;
    this.listener = listener;
  }

  say(event: string, fields: Record<string, unknown>, human: string): void {
    this.listener?.({ event, ...fields });
    if (this.json) process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
    else process.stderr.write(`[swarmtune join] ${human}\n`);
  }

  assigned(a: Assignment): void {
    this.say('assigned', { run_id: a.runId, stage: a.stageIndex, layer_start: a.layerStart, layer_end: a.layerEnd, num_stages: a.numStages, step: a.step },
      `assigned stage ${a.stageIndex} (${a.numStages === 1 ? 'the only stage' : `stages 0–${a.numStages - 1}`}): layers [${a.layerStart}, ${a.layerEnd}) at step ${a.step}`);
  }

  /** A progress line while serving; `sinceMicroBatches` is the count at the previous line. */
  progress(p: StageProgress, sinceMicroBatches: number): void {
    this.say('progress', {
      stage: p.stage, layer_start: p.layerStart, layer_end: p.layerEnd, step: p.step, total_steps: p.totalSteps,
      micro_batches: p.microBatches, tokens_per_s: p.tokensPerSecond,
    }, `stage ${p.stage} (layers [${p.layerStart}, ${p.layerEnd})): step ${p.step}/${p.totalSteps}, ${p.microBatches} micro-batches served` +
      ` (+${p.microBatches - sinceMicroBatches}), ${p.tokensPerSecond.toFixed(1)} tokens/s`);
  }

  /** A blob served from the cache, fetched, refused as corrupt, or a provider that failed. */
  blob(e: BlobEvent): void {
    const human = e.kind === 'cache-hit' ? `blob ${e.name} ${e.sha256.slice(0, 12)} verified from cache`
      : e.kind === 'fetched' ? `blob ${e.name} ${e.sha256.slice(0, 12)} fetched (${e.sizeBytes} bytes) from ${e.from}`
        : e.kind === 'corrupt-cache' ? `cached blob ${e.name} ${e.sha256.slice(0, 12)} is corrupt (hashes to ${e.got.slice(0, 12)}); refused, fetching again`
          : `provider ${e.from} failed for blob ${e.name}: ${e.error || 'no reason given'}`;
    this.say('blob', { ...e }, human);
  }

  /** The error that ends the volunteer: `line` is what the user reads (`swarmtune join: …` on stderr, the
   *  form every command shares), `exitCode` what the process exits with. */
  error(e: Error, line = `${e.name}: ${e.message}`, exitCode?: number): void {
    const fields = { name: e.name, message: e.message, ...(exitCode !== undefined ? { exit_code: exitCode } : {}) };
    this.listener?.({ event: 'error', ...fields });
    if (this.json) process.stdout.write(JSON.stringify({ event: 'error', ...fields }) + '\n');
    else process.stderr.write(`swarmtune join: ${line}\n`);
  }
}

/** Print a progress line every `intervalMs` while `read` has something new (a step or micro-batches
 *  since the last line); returns the stop function. `intervalMs` 0: never. */
export function reportProgress(events: VolunteerEvents, read: () => StageProgress, intervalMs: number): () => void {
  if (intervalMs <= 0) return () => {};
  let last = read();
  const timer = setInterval(() => {
    const p = read();
    if (p.step === last.step && p.microBatches === last.microBatches) return;
    events.progress(p, last.microBatches);
    last = p;
  }, intervalMs);
  timer.unref();
  return () => clearInterval(timer);
}
