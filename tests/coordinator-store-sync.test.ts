// The coordinator's step commit is a synced LevelDB write (durable through power loss, not only a
// crash): the options that reach classic-level's native layer are recorded by wrapping its _batch/_put.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Level } from 'level';
import { RunStore } from '../coordinator/store.ts';

type Recorded = { op: 'batch' | 'put'; keys: string[]; sync: boolean };

test('commitStep and the initial adapter reach LevelDB as synced writes, in one batch per commit', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'store-sync-'));
  const proto = Level.prototype as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>;
  const origBatch = proto._batch!;
  const origPut = proto._put!;
  const seen: Recorded[] = [];
  proto._batch = function (this: unknown, ops: unknown, options: unknown) {
    seen.push({ op: 'batch', keys: (ops as Array<{ key: string }>).map((o) => String(o.key)), sync: (options as { sync?: boolean }).sync === true });
    return origBatch.call(this, ops, options);
  };
  proto._put = function (this: unknown, key: unknown, value: unknown, options: unknown) {
    seen.push({ op: 'put', keys: [String(key)], sync: (options as { sync?: boolean }).sync === true });
    return origPut.call(this, key, value, options);
  };
  try {
    const store = await RunStore.open(path.join(dir, 'db'));
    await store.putInitialAdapter(new Uint8Array([1, 2, 3]));
    const rec = { step: 1, loss: 2, lr: 1e-3, gradNorm: 0.5, tokens: 10, tokensPerSecond: 100, timeMs: 5, cursor: 4 };
    await store.commitStep(rec, new Uint8Array([4, 5]), [new Uint8Array([6]), new Uint8Array([7])]);
    await store.commitStep({ ...rec, step: 2, cursor: 8 }, new Uint8Array([8]), null, [{ step: 1, stages: 2 }]);
    const initial = seen.find((r) => r.keys.includes('adapter:0000000000'));
    assert.deepEqual(initial, { op: 'put', keys: ['adapter:0000000000'], sync: true });
    const commits = seen.filter((r) => r.keys.includes('latest'));
    assert.equal(commits.length, 2, 'one batch per commit');
    for (const c of commits) {
      assert.equal(c.op, 'batch');
      assert.equal(c.sync, true, `commit batch ${c.keys.join(',')} is not synced`);
    }
    assert.ok(commits[0]!.keys.includes('optim:0000000001:0000000001') && commits[0]!.keys.includes('ckpt:0000000001'), 'checkpoint in the same batch');
    assert.ok(commits[1]!.keys.includes('ckpt:0000000001'), 'the prune is in the same batch as the commit');
    // and what was committed reads back after a reopen
    await store.close();
    const again = await RunStore.open(path.join(dir, 'db'));
    assert.equal((await again.latest())?.step, 2);
    assert.deepEqual([...(await again.adapter(1))!], [4, 5]);
    assert.equal(await again.latestCheckpoint(), null);
    await again.close();
  } finally {
    proto._batch = origBatch;
    proto._put = origPut;
    await rm(dir, { recursive: true, force: true });
  }
});
