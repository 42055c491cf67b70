// Child process of tests/gpu/async.gpu.ts: a kernel fault poisons the process's CUDA context for good, so it is
// provoked here, away from the other GPU tests. Prints one JSON line describing what each step reported.
import { CudaAsyncError, CudaError, loadCudaBackend } from '../../cuda/index.ts';

const be = await loadCudaBackend({ weightCacheBytes: 0 });
if (!be) {
  console.log(JSON.stringify({ error: 'no CUDA backend' }));
  process.exit(0);
}
const tb = be.tensors();
const describe = (e: unknown) => ({
  name: (e as Error).name, async: e instanceof CudaAsyncError, cuda: e instanceof CudaError,
  status: (e as CudaError).status, op: (e as CudaError).op, message: (e as Error).message,
});
const out: Record<string, unknown> = {};
const t = await tb.upload(new Float32Array([1, 2, 3, 4]));
try {
  await be.debugFault('illegal-address');
  out.faultReturned = true;        // launched and returned: the fault has not been seen yet
} catch (e) {
  out.faultReturned = describe(e);
}
try {
  await tb.add(t, t, 4);            // queued behind the faulting kernel (may already see the sticky error)
  out.addAfter = 'ok';
} catch (e) {
  out.addAfter = describe(e);
}
try {
  await tb.download(t);
  out.download = 'ok';
} catch (e) {
  out.download = describe(e);
}
try {
  await tb.add(t, t, 4);
  await tb.download(t);
  out.later = 'ok';
} catch (e) {
  out.later = describe(e);
}
out.stats = be.opStats();
console.log(JSON.stringify(out));
process.exit(0);
