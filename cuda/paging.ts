// Paged-optimizer geometry for the CUDA backend: device staging-slot sizes and the page plan under a device budget.
//
// Mirrors stc_paged_slot_bytes in cuda/src/adamw.cu (tests/cuda-build.test.ts checks both agree when
// the library is built), so callers can plan memory without loading the library.

/** bitsandbytes 8-bit blockwise optimizer block (BLOCKSIZE_2STATE since 0.44.0) */
export const OPT_QUANT_BLOCK = 256;
/** bitsandbytes min_8bit_size: smaller tensors keep fp32 optimizer state even in 8-bit mode */
export const MIN_8BIT_SIZE = 4096;
/** default page: 1 Mi elements (16 MiB of p+g+fp32 state per staging slot) */
export const DEFAULT_PAGE_ELEMS = 1 << 20;

export type OptimizerBits = 8 | 32;

/** Device bytes one staging slot needs: a page of p and g (fp32) plus the page's optimizer state. */
export function pagedSlotBytes(bits: OptimizerBits, pageElems: number): number {
  if (!Number.isInteger(pageElems) || pageElems <= 0 || pageElems % OPT_QUANT_BLOCK !== 0) {
    throw new RangeError(`pagedSlotBytes: pageElems=${pageElems} must be a positive multiple of ${OPT_QUANT_BLOCK}`);
  }
  const pg = 8 * pageElems;
  if (bits === 32) return pg + 8 * pageElems;
  // an 8-bit page (codes + one absmax per block for each state), or a whole small tensor kept in fp32
  const quantized = 2 * pageElems + 8 * (pageElems / OPT_QUANT_BLOCK);
  const smallFp32 = 8 * Math.min(pageElems, MIN_8BIT_SIZE - 1);
  return pg + Math.max(quantized, smallFp32);
}

/** Host (pinned) bytes of one tensor's optimizer state. */
export function pagedStateBytes(bits: OptimizerBits, n: number): number {
  if (bits === 8 && n >= MIN_8BIT_SIZE) return 2 * n + 8 * Math.ceil(n / OPT_QUANT_BLOCK);
  return 8 * n;
}

export interface PagedPlan {
  pageElems: number;
  slots: number;
  slotBytes: number;
  /** slots * slotBytes: what the optimizer holds on the device, always <= the budget */
  deviceBytes: number;
}

/** Chooses page size and slot count so the device staging fits `deviceBudgetBytes`. Two slots let the
 *  copy of one page overlap the update of the other; more add nothing once copies and updates overlap.
 *  The page shrinks (by halves, to a multiple of 256) until at least one slot fits. */
export function planPagedOptimizer(opts: {
  bits: OptimizerBits;
  deviceBudgetBytes: number;
  pageElems?: number;
  maxSlots?: number;
}): PagedPlan {
  const { bits, deviceBudgetBytes } = opts;
  if (bits !== 8 && bits !== 32) throw new RangeError(`planPagedOptimizer: bits must be 8 or 32, got ${bits}`);
  if (!(deviceBudgetBytes > 0)) throw new RangeError(`planPagedOptimizer: deviceBudgetBytes=${deviceBudgetBytes} must be positive`);
  const maxSlots = opts.maxSlots ?? 2;
  if (!Number.isInteger(maxSlots) || maxSlots < 1 || maxSlots > 8) {
    throw new RangeError(`planPagedOptimizer: maxSlots=${maxSlots} must be an integer in 1..8`);
  }
  let pageElems = Math.floor((opts.pageElems ?? DEFAULT_PAGE_ELEMS) / OPT_QUANT_BLOCK) * OPT_QUANT_BLOCK;
  if (pageElems < OPT_QUANT_BLOCK) {
    throw new RangeError(`planPagedOptimizer: pageElems=${opts.pageElems} is below one ${OPT_QUANT_BLOCK}-element block`);
  }
  while (pagedSlotBytes(bits, pageElems) > deviceBudgetBytes && pageElems > OPT_QUANT_BLOCK) {
    pageElems = Math.max(OPT_QUANT_BLOCK, Math.floor(pageElems / 2 / OPT_QUANT_BLOCK) * OPT_QUANT_BLOCK);
  }
  const slotBytes = pagedSlotBytes(bits, pageElems);
  if (slotBytes > deviceBudgetBytes) {
    throw new RangeError(`planPagedOptimizer: even a ${OPT_QUANT_BLOCK}-element page needs ${slotBytes} device bytes, over the budget of ${deviceBudgetBytes}`);
  }
  const slots = Math.min(maxSlots, Math.floor(deviceBudgetBytes / slotBytes));
  return { pageElems, slots, slotBytes, deviceBytes: slots * slotBytes };
}
