// The engine's backends: the registry that picks one by kind ('auto' | 'cpu' | 'ref' | 'cuda' | 'cuda:N'), its self-checks, the CPU implementations.
export { createBackend, registerBackend, probeDevice, BackendUnavailableError } from './registry.ts';
export type { BackendKind, BackendProvider, CreateBackendOptions, DeviceProbe } from './registry.ts';
export { selfCheck, selfCheckTensors } from './self-check.ts';
export { NativeBackend, NativeOpError, NativeAddonMissingError, defaultThreadCount } from './native.ts';
export { RefBackend, RefOpError } from './ref.ts';
