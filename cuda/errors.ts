// Typed errors of the CUDA backend (re-exported by cuda/index.ts).

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
