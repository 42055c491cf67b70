// Flag value parsers shared by several commands (a bad value throws, naming the flag).
export function nonNegativeInt(what: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${what} must be a non-negative integer, got "${v}"`);
    return n;
  };
}
