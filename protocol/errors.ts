// Typed protocol errors with stable `name`s; they cross the wire as {name, message} in error frames.

export class SwarmError extends Error {
  override name = 'SwarmError';
}
/** A length prefix announced a frame larger than the cap (the stream is aborted before buffering it). */
export class FrameTooLargeError extends SwarmError {
  override name = 'FrameTooLargeError';
}
/** Bytes that are not valid msgpack, or a truncated frame. */
export class DecodeError extends SwarmError {
  override name = 'DecodeError';
}
/** A decoded message whose fields are unknown, missing, of the wrong type or out of bounds. */
export class SchemaError extends SwarmError {
  override name = 'SchemaError';
}
/** A tensor whose dtype/codec/shape/byte length disagree or whose values are not finite. */
export class TensorError extends SwarmError {
  override name = 'TensorError';
}
/** A message for a step or attempt that is no longer current. */
export class StaleError extends SwarmError {
  override name = 'StaleError';
}
/** A peer without the run's join token, or not admitted to the run. */
export class AuthError extends SwarmError {
  override name = 'AuthError';
}
/** The planner found no stage this peer can hold. */
export class CapacityError extends SwarmError {
  override name = 'CapacityError';
}
/** A blob whose content does not hash to the sha256 it was requested by. */
export class IntegrityError extends SwarmError {
  override name = 'IntegrityError';
}
export class TimeoutError extends SwarmError {
  override name = 'TimeoutError';
}
/** The remote answered with an error frame; `remoteName` is its error's stable name. */
export class RemoteError extends SwarmError {
  override name = 'RemoteError';
  remoteName: string;
  constructor(remoteName: string, message: string) {
    super(`${remoteName}: ${message}`);
    this.remoteName = remoteName;
  }
}

const KNOWN: Record<string, new (m: string) => SwarmError> = {
  FrameTooLargeError, DecodeError, SchemaError, TensorError, StaleError, AuthError, CapacityError,
  IntegrityError, TimeoutError,
};

/** Rebuild a typed error from an error frame so callers can branch on `name` across the wire. */
export function errorFromWire(name: string, message: string): SwarmError {
  const C = KNOWN[name];
  if (C !== undefined) return new C(message);
  return new RemoteError(name, message);
}
