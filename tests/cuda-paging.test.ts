// Unit tests of the paged-optimizer plan (cuda/paging.ts): slot sizes and the device-budget rule. Pure arithmetic, milliseconds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_PAGE_ELEMS, MIN_8BIT_SIZE, OPT_QUANT_BLOCK, pagedSlotBytes, pagedStateBytes, planPagedOptimizer } from '../cuda/paging.ts';

test('slot bytes: p and g in fp32 plus the page state of each precision', () => {
  const pe = 1 << 20;
  // 32-bit: p, g, m, v, 4 bytes each
  assert.equal(pagedSlotBytes(32, pe), 4 * 4 * pe);
  // 8-bit: p, g fp32 + two uint8 codes + two fp32 absmax per 256-element block
  assert.equal(pagedSlotBytes(8, pe), 8 * pe + 2 * pe + 2 * 4 * (pe / 256));
  // a page smaller than min_8bit_size must still hold a small tensor's fp32 m and v
  assert.equal(pagedSlotBytes(8, 256), 8 * 256 + 8 * 256);
  assert.throws(() => pagedSlotBytes(8, 300), RangeError);
  assert.throws(() => pagedSlotBytes(32, 0), RangeError);
});

test('state bytes: 8-bit only from min_8bit_size elements on (bitsandbytes)', () => {
  assert.equal(pagedStateBytes(8, MIN_8BIT_SIZE - 1), 8 * (MIN_8BIT_SIZE - 1));
  assert.equal(pagedStateBytes(8, MIN_8BIT_SIZE), 2 * MIN_8BIT_SIZE + 8 * (MIN_8BIT_SIZE / OPT_QUANT_BLOCK));
  assert.equal(pagedStateBytes(8, 1000001), 2 * 1000001 + 8 * Math.ceil(1000001 / 256));
  assert.equal(pagedStateBytes(32, 5000), 40000);
});

test('plan keeps the default page and two slots when the budget allows', () => {
  const p = planPagedOptimizer({ bits: 32, deviceBudgetBytes: 1 << 30 });
  assert.equal(p.pageElems, DEFAULT_PAGE_ELEMS);
  assert.equal(p.slots, 2);
  assert.equal(p.deviceBytes, 2 * pagedSlotBytes(32, DEFAULT_PAGE_ELEMS));
});

test('plan never exceeds the device budget, shrinking the page when it must', () => {
  for (const bits of [8, 32] as const) {
    for (const budget of [4096, 10000, 65536, 1e6, 16 * 2 ** 20 + 1, 48 * 2 ** 20, 2 ** 31]) {
      const p = planPagedOptimizer({ bits, deviceBudgetBytes: budget });
      assert.ok(p.deviceBytes <= budget, `bits=${bits} budget=${budget}: ${p.deviceBytes} bytes planned`);
      assert.ok(p.slots >= 1 && p.slots <= 2);
      assert.equal(p.pageElems % OPT_QUANT_BLOCK, 0);
      assert.equal(p.slotBytes, pagedSlotBytes(bits, p.pageElems));
      // the page is as large as allowed: doubling it (up to the default) would not fit
      if (p.pageElems < DEFAULT_PAGE_ELEMS) assert.ok(pagedSlotBytes(bits, p.pageElems * 2) > budget);
    }
  }
});

test('plan rejects budgets below one block and bad options with RangeError', () => {
  assert.throws(() => planPagedOptimizer({ bits: 32, deviceBudgetBytes: 4095 }), /even a 256-element page needs 4096 device bytes/);
  assert.throws(() => planPagedOptimizer({ bits: 32, deviceBudgetBytes: 0 }), RangeError);
  assert.throws(() => planPagedOptimizer({ bits: 32, deviceBudgetBytes: 1e9, maxSlots: 0 }), RangeError);
  assert.throws(() => planPagedOptimizer({ bits: 32, deviceBudgetBytes: 1e9, pageElems: 100 }), RangeError);
  assert.equal(planPagedOptimizer({ bits: 8, deviceBudgetBytes: 1e9, maxSlots: 1 }).slots, 1);
});
