// Typed errors of the CUDA backend (re-exported by cuda/index.ts) and the conversion of the addon's errors into them.

/** A failure reported by the CUDA library (driver, launch, out-of-memory, ...). `status` is the
 *  cudaError_t value or one of the library's own codes (10001 invalid argument, 10002 no device,
 *  10003 budget, 10004 pinned host allocation). */
export class CudaError extends Error {
  override name = 'CudaError';
  readonly status: number;
  readonly op: string;
  constructor(message: string, status: number, op: string) {
    super(message);
    this.status = status;
    this.op = op;
  }
}

/** A kernel of an earlier op failed while it ran on the device (illegal address, launch failure, device
 *  assert, ...) and this op is the first call to see it: device-only ops return without waiting for their
 *  kernels, so a fault is reported by a later wait, typically the next download. Also thrown for every
 *  call after such a failure, which leaves the CUDA context unusable (sticky): dispose the backend and
 *  restart the process. `op` is the op that saw it, not the one that caused it; loadCudaBackend({
 *  syncEachOp: true }) (or SWARMTUNE_CUDA_SYNC=1) makes every op wait so the culprit reports it itself. */
export class CudaAsyncError extends CudaError {
  override name = 'CudaAsyncError';
  readonly asynchronous = true;
}

/** An op was called with arguments that do not fit its contract (checked before any device work). */
export class CudaArgumentError extends Error {
  override name = 'CudaArgumentError';
}

/** The typed error for a failure the addon reported (its errors carry `cudaStatus` and `asynchronous`), with the
 *  op that saw it in the message; argument errors and anything else pass through unchanged. */
export function toCudaError(e: unknown, op: string): Error {
  if (e instanceof CudaError || e instanceof CudaArgumentError) return e;
  if (e instanceof Error && typeof (e as { cudaStatus?: unknown }).cudaStatus === 'number') {
    const status = (e as unknown as { cudaStatus: number }).cudaStatus;
    if ((e as { asynchronous?: unknown }).asynchronous === true) return new CudaAsyncError(`${op}: ${e.message}`, status, op);
    return new CudaError(`${op}: ${e.message}`, status, op);
  }
  return e instanceof Error ? e : new Error(String(e));
}
