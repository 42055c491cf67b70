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

/** An op was called with arguments that do not fit its contract (checked before any device work). */
export class CudaArgumentError extends Error {
  override name = 'CudaArgumentError';
}
