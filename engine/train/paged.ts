// Paged optimizer-state store: fixed-size byte pages with a resident-memory budget; pages past it spill to
// files on disk and are read back when the optimizer updates them. Used by the trainer and by volunteers.
//
// Why pages and not whole tensors: one LoRA tensor's state can be larger than the budget, and an update only
// ever touches one page at a time, so the resident set never has to exceed budget + one page.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface PagedStoreOptions {
  /** bytes of pages kept in memory; Infinity never spills */
  residentBytes: number;
  /** directory for spilled page files (created on first spill); required when residentBytes is finite */
  spillDir?: string;
}

export interface PagedStoreStats {
  pages: number;
  totalBytes: number;
  residentBytes: number;
  peakResidentBytes: number;
  spills: number;
  loads: number;
}

interface Page {
  id: number;
  bytes: number;
  /** null while spilled */
  data: Uint8Array | null;
  /** file holding the spilled copy; kept so a page spilled unchanged is not rewritten */
  onDisk: boolean;
  dirty: boolean;
  lastUse: number;
}

export class PagedStore {
  readonly residentLimitBytes: number;
  readonly spillDir: string | null;
  private readonly pages: Page[] = [];
  private clock = 0;
  private resident = 0;
  private peak = 0;
  private spills = 0;
  private loads = 0;
  private dirCreated = false;

  constructor(opts: PagedStoreOptions) {
    if (!(opts.residentBytes >= 0)) throw new RangeError(`PagedStore: residentBytes must be >= 0, got ${opts.residentBytes}`);
    if (Number.isFinite(opts.residentBytes) && !opts.spillDir) {
      throw new Error('PagedStore: a finite residentBytes budget needs a spillDir for pages past it');
    }
    this.residentLimitBytes = opts.residentBytes;
    this.spillDir = opts.spillDir ?? null;
  }

  /** Allocate a zero-filled page and return its id. */
  allocate(bytes: number): number {
    if (!Number.isInteger(bytes) || bytes <= 0) throw new RangeError(`PagedStore.allocate: bytes must be a positive integer, got ${bytes}`);
    const page: Page = { id: this.pages.length, bytes, data: new Uint8Array(bytes), onDisk: false, dirty: true, lastUse: ++this.clock };
    this.pages.push(page);
    this.resident += bytes;
    this.peak = Math.max(this.peak, this.resident);
    this.evict(page.id);
    return page.id;
  }

  /** Run fn on the resident bytes of a page (loading it if spilled). The view is valid only inside fn;
   *  writes through it are kept. Afterwards pages past the budget spill, least recently used first. */
  use<T>(id: number, fn: (bytes: Uint8Array) => T, opts: { write?: boolean } = {}): T {
    const page = this.page(id);
    if (!page.data) this.load(page);
    page.lastUse = ++this.clock;
    if (opts.write !== false) page.dirty = true;
    try {
      return fn(page.data!);
    } finally {
      this.evict(-1);
    }
  }

  pageBytes(id: number): number {
    return this.page(id).bytes;
  }

  get pageCount(): number {
    return this.pages.length;
  }

  stats(): PagedStoreStats {
    let total = 0;
    for (const p of this.pages) total += p.bytes;
    return { pages: this.pages.length, totalBytes: total, residentBytes: this.resident, peakResidentBytes: this.peak, spills: this.spills, loads: this.loads };
  }

  /** Delete spill files. The store must not be used afterwards. */
  dispose(): void {
    for (const p of this.pages) p.data = null;
    if (this.spillDir && this.dirCreated) rmSync(this.spillDir, { recursive: true, force: true });
  }

  private page(id: number): Page {
    const p = this.pages[id];
    if (!p) throw new RangeError(`PagedStore: no page ${id} (have ${this.pages.length})`);
    return p;
  }

  private file(page: Page): string {
    return join(this.spillDir!, `page-${page.id}.bin`);
  }

  private load(page: Page): void {
    const buf = readFileSync(this.file(page));
    if (buf.length !== page.bytes) throw new Error(`PagedStore: spill file ${this.file(page)} has ${buf.length} bytes, expected ${page.bytes}`);
    // copy: a Buffer may sit at an offset that float views over the page cannot use
    page.data = new Uint8Array(page.bytes);
    page.data.set(buf);
    page.dirty = false;
    this.resident += page.bytes;
    this.peak = Math.max(this.peak, this.resident);
    this.loads++;
  }

  private evict(keepId: number): void {
    if (this.resident <= this.residentLimitBytes) return;
    const candidates = this.pages.filter((p) => p.data && p.id !== keepId).sort((a, b) => a.lastUse - b.lastUse);
    for (const p of candidates) {
      if (this.resident <= this.residentLimitBytes) break;
      if (!this.dirCreated) {
        mkdirSync(this.spillDir!, { recursive: true });
        this.dirCreated = true;
      }
      if (p.dirty || !p.onDisk) writeFileSync(this.file(p), p.data!);
      p.onDisk = true;
      p.dirty = false;
      p.data = null;
      this.resident -= p.bytes;
      this.spills++;
    }
  }
}
