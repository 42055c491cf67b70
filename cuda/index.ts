// The public entry of cuda/: the CUDA backend behind the engine's Backend interface, its optimizers, device
// tensors and errors, the addon loader and the device probe. bin/ registers the backend from here.
//
// Where each part lives: cuda/native.ts finds and loads the N-API addon (cuda/addon/*.cc), says why it is
// unavailable and probes the device; cuda/backend.ts is CudaBackend (and loadCudaBackend); cuda/optimizer.ts
// the paged AdamW and the engine Optimizer over it; cuda/tensors.ts the device-resident tensors;
// cuda/weight-cache.ts which NF4 weights stay on the device; cuda/errors.ts the typed errors.
export { CudaArgumentError, CudaAsyncError, CudaError } from './errors.ts';
export type { WeightCacheStats } from './weight-cache.ts';
export { CudaTensor, CudaTensors, type CudaTensorStats } from './tensors.ts';
export { CUDA_ADDON_PATH, cudaUnavailableReason, loadCudaAddon, probeCuda, type CudaDeviceInfo, type CudaOpStats,
  type CudaProbe } from './native.ts';
export { CudaBackend, defaultWeightCacheBytes, loadCudaBackend, WEIGHT_CACHE_RESERVE_BYTES, type CudaNF4Bench, type F32,
  type LoadCudaOptions } from './backend.ts';
export { CudaPagedAdamW, type AdamW8bitState, type AdamWHyper } from './optimizer.ts';
