// Simulated time: an event queue (a binary heap ordered by time, then by insertion) and the driver that
// runs async simulation code against it. Nothing sleeps: a wait is a timer in the queue.

interface Timer { t: number; seq: number; fn: () => void }

export class DeadlockError extends Error {
  override name = 'DeadlockError';
}

export class SimClock {
  now = 0;
  events = 0;
  private heap: Timer[] = [];
  private seq = 0;

  /** run fn at now + ms */
  at(ms: number, fn: () => void): void {
    const h = this.heap;
    const x: Timer = { t: this.now + Math.max(0, ms), seq: this.seq++, fn };
    h.push(x);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!less(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }

  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => this.at(ms, resolve));
  }

  private pop(): Timer | undefined {
    const h = this.heap;
    if (h.length === 0) return undefined;
    const top = h[0]!;
    const last = h.pop()!;
    if (h.length > 0) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < h.length && less(h[l]!, h[m]!)) m = l;
        if (r < h.length && less(h[r]!, h[m]!)) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m]!, h[i]!];
        i = m;
      }
    }
    return top;
  }

  /** Run `main` to its end in simulated time: between events every continuation they caused settles
   *  (setImmediate runs after the microtask queue is empty), so each event sees the state its
   *  predecessors left. Every event of one instant runs in one go. */
  async drive<T>(main: Promise<T>): Promise<T> {
    let done = false;
    let failed: unknown = null;
    main.then(() => { done = true; }, (e) => { done = true; failed = e ?? new Error('simulation failed'); });
    for (;;) {
      await new Promise<void>((r) => setImmediate(r));
      if (done) break;
      const first = this.pop();
      if (first === undefined) throw new DeadlockError(`the simulation is waiting at t = ${(this.now / 1000).toFixed(1)} s with no event left`);
      this.now = first.t;
      this.events++;
      first.fn();
      while (this.heap.length > 0 && this.heap[0]!.t === this.now) { this.events++; this.pop()!.fn(); }
    }
    if (failed !== null) throw failed;
    return main;
  }
}

function less(a: Timer, b: Timer): boolean {
  return a.t < b.t || (a.t === b.t && a.seq < b.seq);
}
