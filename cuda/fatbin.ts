// Lists the GPU code embedded in a shared library's .nv_fatbin section (SASS per sm_XX, PTX per compute_XX) without cuobjdump.
//
// Layout (stable since CUDA 4, as read by cuobjdump and open-source fatbin tools): the section holds one
// fatbin per object file, each a 16-byte header {magic 0xBA55ED50 u32, version u16, headerSize u16,
// payloadSize u64} followed by entries {kind u16 (1 PTX, 2 ELF), _, headerSize u32, payloadSize u64,
// ..., arch u32 at byte 28}.
import { readFileSync } from 'node:fs';

export interface FatbinEntry { kind: 'ptx' | 'sass'; arch: number }

const FATBIN_MAGIC = 0xba55ed50;

export function listFatbinEntries(libPath: string): FatbinEntry[] {
  const buf = readFileSync(libPath);
  if (buf.readUInt32BE(0) !== 0x7f454c46 || buf[4] !== 2) throw new Error(`${libPath}: not a 64-bit ELF file`);
  const shoff = Number(buf.readBigUInt64LE(0x28));
  const shentsize = buf.readUInt16LE(0x3a), shnum = buf.readUInt16LE(0x3c), shstrndx = buf.readUInt16LE(0x3e);
  const section = (i: number) => {
    const o = shoff + i * shentsize;
    return { name: buf.readUInt32LE(o), off: Number(buf.readBigUInt64LE(o + 0x18)), size: Number(buf.readBigUInt64LE(o + 0x20)) };
  };
  const strtab = section(shstrndx);
  const nameOf = (off: number) => {
    let e = strtab.off + off, s = '';
    while (buf[e]) s += String.fromCharCode(buf[e++]);
    return s;
  };
  const out: FatbinEntry[] = [];
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    if (nameOf(s.name) !== '.nv_fatbin') continue;
    const end = s.off + s.size;
    let p = s.off;
    while (p + 16 <= end) {
      // fatbins are 8-byte aligned within the section; padding between them is skipped
      if (buf.readUInt32LE(p) !== FATBIN_MAGIC) { p += 8; continue; }
      const headerSize = buf.readUInt16LE(p + 6);
      const fatEnd = p + headerSize + Number(buf.readBigUInt64LE(p + 8));
      let q = p + headerSize;
      while (q + 32 <= fatEnd) {
        const kind = buf.readUInt16LE(q), entryHeader = buf.readUInt32LE(q + 4);
        const size = Number(buf.readBigUInt64LE(q + 8)), arch = buf.readUInt32LE(q + 28);
        if (kind === 1 || kind === 2) out.push({ kind: kind === 1 ? 'ptx' : 'sass', arch });
        if (entryHeader === 0) break;  // malformed: never loop forever
        q += entryHeader + size;
      }
      p = Math.max(fatEnd, p + 16);
    }
  }
  return out;
}
