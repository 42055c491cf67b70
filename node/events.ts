// What a volunteer tells its user: one event per line, a JSON object on stdout (--json) or a
// `[swarmtune join] …` sentence on stderr; the same objects go to an optional listener (tests).
import type { BlobEvent } from '../protocol/blobs.ts';

export type EventListener = (e: Record<string, unknown>) => void;

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

  /** A blob served from the cache, fetched, refused as corrupt, or a provider that failed. */
  blob(e: BlobEvent): void {
    const human = e.kind === 'cache-hit' ? `blob ${e.name} ${e.sha256.slice(0, 12)} verified from cache`
      : e.kind === 'fetched' ? `blob ${e.name} ${e.sha256.slice(0, 12)} fetched (${e.sizeBytes} bytes) from ${e.from}`
        : e.kind === 'corrupt-cache' ? `cached blob ${e.name} ${e.sha256.slice(0, 12)} is corrupt (hashes to ${e.got.slice(0, 12)}); refused, fetching again`
          : `provider ${e.from} failed for blob ${e.name}: ${e.error}`;
    this.say('blob', { ...e }, human);
  }

  error(e: Error): void {
    this.say('error', { name: e.name, message: e.message }, `error: ${e.name}: ${e.message}`);
  }
}
