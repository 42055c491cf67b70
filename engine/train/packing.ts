// Packing as TRL's SFTTrainer does it with packing=True (its default packing_strategy "bfd", which turns on
// padding_free): examples, already truncated to max_length, are placed into rows of at most max_length tokens by
// best-fit decreasing (pack_dataset's _pack_bfd); the packed rows are the dataset the Trainer shuffles and batches;
// a micro-batch's rows are flattened into one row without padding (DataCollatorForLanguageModeling with
// padding_free / DataCollatorWithFlattening), position ids restarting at every example, and attention stays
// inside each example (the stage runs attention example by example: engine/model/layer.ts). Labels are shifted
// within each example before packing, so no example predicts the next one's first token (TRL masks that
// position with -100). The loss is normalized as without packing: Σ token losses / label tokens of the step.

/** What packing reads of a tokenized example (engine/train/data.ts TokenizedExample; not imported: data.ts
 *  collates packed rows with concatExamples) */
export interface TokenizedExample {
  ids: Int32Array;
  labels: Int32Array;
  labelTokens: number;
  line: number;
}

/** A packed row: its examples' ids and labels concatenated, and their lengths. */
export interface PackedExample extends TokenizedExample {
  /** lengths of the examples in this row, in order, summing to ids.length */
  segments: Int32Array;
}

/** Best-fit decreasing: examples by length, longest first (ties in dataset order), each into the open row
 *  with the least room that still fits it (ties: the row opened first), else a new row. Rows keep their
 *  examples in insertion order and come out in the order they were opened, as TRL's _pack_bfd. */
export function packExamples(examples: readonly TokenizedExample[], maxLength: number): PackedExample[] {
  if (!Number.isInteger(maxLength) || maxLength <= 0) throw new RangeError(`packing: max_length must be a positive integer, got ${maxLength}`);
  const order = examples.map((e, i) => i).sort((a, b) => examples[b].ids.length - examples[a].ids.length || a - b);
  const bins: { room: number; members: number[] }[] = [];
  for (const i of order) {
    const len = examples[i].ids.length;
    if (len > maxLength) throw new RangeError(`packing: example on line ${examples[i].line} has ${len} tokens, more than max_length ${maxLength}`);
    let best = -1;
    for (let b = 0; b < bins.length; b++) {
      if (bins[b].room >= len && (best < 0 || bins[b].room < bins[best].room)) best = b;
    }
    if (best < 0) {
      bins.push({ room: maxLength, members: [] });
      best = bins.length - 1;
    }
    bins[best].room -= len;
    bins[best].members.push(i);
  }
  return bins.map((bin) => concatExamples(bin.members.map((i) => examples[i])));
}

/** examples (packed rows or plain) concatenated into one row, their segment lengths kept */
export function concatExamples(parts: readonly TokenizedExample[]): PackedExample {
  const n = parts.reduce((s, e) => s + e.ids.length, 0);
  const ids = new Int32Array(n), labels = new Int32Array(n);
  const segments: number[] = [];
  let at = 0, labelTokens = 0;
  for (const e of parts) {
    ids.set(e.ids, at);
    labels.set(e.labels, at);
    at += e.ids.length;
    labelTokens += e.labelTokens;
    const seg = (e as Partial<PackedExample>).segments;
    if (seg) segments.push(...seg);
    else segments.push(e.ids.length);
  }
  return { ids, labels, labelTokens, line: parts[0]?.line ?? 0, segments: Int32Array.from(segments) };
}

/** Share of a micro-batch's token positions that are padding: what packing saves (bench/packing.ts). */
export function paddingFraction(mb: { batch: number; seqLen: number; inputTokens: number }): number {
  const all = mb.batch * mb.seqLen;
  return all === 0 ? 0 : 1 - mb.inputTokens / all;
}
