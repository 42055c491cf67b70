// Kernel resource usage as ptxas reports it (`nvcc -Xptxas -v`, kept by cuda/build.sh in
// cuda/build/resources.txt): registers, static shared memory, stack and spills per kernel and target.
// Launch limits that fail only on a real GPU ("too many resources requested for launch", shared
// memory over the limit) can be checked against these numbers without one (tests/cuda-resources.test.ts).

export interface KernelResources {
  /** mangled entry name, as ptxas prints it */
  mangled: string;
  /** short readable name: `rope_kernel`, `attn_fwd_kernel<16>`, `gemm_tc_kernel<0,1,LoadNF4>` */
  name: string;
  /** 'sm_80' etc. */
  arch: string;
  registers: number;
  /** static shared memory in bytes (dynamic shared memory is set at launch) */
  sharedBytes: number;
  stackBytes: number;
  spillStoreBytes: number;
  spillLoadBytes: number;
}

/** Walk a run of Itanium <length><identifier> names: the last identifier and what follows the run. */
function lastSourceName(s: string): { last: string; rest: string } {
  let last = '';
  for (;;) {
    const n = /^(\d+)/.exec(s);
    if (!n) return { last, rest: s };
    const len = Number(n[1]);
    last = s.slice(n[1]!.length, n[1]!.length + len);
    s = s.slice(n[1]!.length + len);
  }
}

/** `_ZN3stc15attn_fwd_kernelILi16EEEvPf…` → `attn_fwd_kernel<16>`; leaves unknown shapes mangled */
export function shortKernelName(mangled: string): string {
  if (!/^_ZN\d/.test(mangled)) return mangled;
  // the last <len><ident> before template args / parameters: walk the nested names
  const { last: name, rest } = lastSourceName(mangled.slice(3));
  if (!rest.startsWith('I')) return name;
  // template arguments: integer literals (Li<N>E) and class names (N3stc7LoadNF4E or <len><name>)
  const args: string[] = [];
  let t = rest.slice(1);
  while (t.length && !t.startsWith('E')) {
    let a: RegExpExecArray | null;
    if ((a = /^Li(-?\d+)E/.exec(t))) { args.push(a[1]!); t = t.slice(a[0].length); continue; }
    if ((a = /^Lb([01])E/.exec(t))) { args.push(a[1] === '1' ? 'true' : 'false'); t = t.slice(a[0].length); continue; }
    if (t.startsWith('N')) {
      // a nested name; `S_` / `S<n>_` are substitutions of names seen before (the namespace)
      const { last, rest: u } = lastSourceName(t.slice(1).replace(/^S\d*_/, ''));
      if (!u.startsWith('E')) break;
      args.push(last);
      t = u.slice(1);
      continue;
    }
    if ((a = /^(\d+)/.exec(t))) {
      const len = Number(a[1]);
      args.push(t.slice(a[1]!.length, a[1]!.length + len));
      t = t.slice(a[1]!.length + len);
      continue;
    }
    break;
  }
  return `${name}<${args.join(',')}>`;
}

/** Parse the concatenated ptxas -v output of a build. Every entry function gets one record per target. */
export function parsePtxasResources(text: string): KernelResources[] {
  const out: KernelResources[] = [];
  let cur: KernelResources | null = null;
  for (const line of text.split('\n')) {
    let m: RegExpExecArray | null;
    if ((m = /Compiling entry function '([^']+)' for '(sm_\d+a?)'/.exec(line))) {
      cur = { mangled: m[1]!, name: shortKernelName(m[1]!), arch: m[2]!, registers: 0, sharedBytes: 0, stackBytes: 0, spillStoreBytes: 0, spillLoadBytes: 0 };
      out.push(cur);
    } else if (cur && (m = /(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads/.exec(line))) {
      cur.stackBytes = Number(m[1]);
      cur.spillStoreBytes = Number(m[2]);
      cur.spillLoadBytes = Number(m[3]);
    } else if (cur && (m = /Used (\d+) registers/.exec(line))) {
      cur.registers = Number(m[1]);
      const s = /(\d+) bytes smem/.exec(line);
      cur.sharedBytes = s ? Number(s[1]) : 0;
      cur = null; // the Used line closes the entry
    }
  }
  return out;
}
