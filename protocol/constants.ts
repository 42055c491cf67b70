// Protocol ids, size limits and timeouts shared by the coordinator and volunteers.

export const PROTOCOL_VERSION = '1.0.0';
export const SOFTWARE_VERSION = '0.1.0';

function pid(name: string): string {
  return `/swarmtune/${name}/${PROTOCOL_VERSION}`;
}

/** One protocol id per stream kind; every stream is one request frame and one response frame,
 *  except `hop` (protocol/hop.ts: a header, then chunks under credit, then the receiver's verdict). */
export const PROTOCOLS = {
  join: pid('join'),
  weights: pid('weights'),
  microbatch: pid('microbatch'),
  hop: pid('hop'),
  commit: pid('commit'),
  recall: pid('recall'),
  aggregate: pid('aggregate'),
  adapter: pid('adapter'),
  status: pid('status'),
  heartbeat: pid('heartbeat'),
  finish: pid('finish'),
  optimizer: pid('optimizer'),
} as const;
export type ProtocolName = keyof typeof PROTOCOLS;

/** Hard cap on one frame: bounds what a hostile peer can make us buffer. The largest messages are
 *  pages of LoRA tensors (PAGE_BYTES) and byte chunks (CHUNK_BYTES); activations never travel in one
 *  frame (hop chunks, HOP_CHUNK_ELEMENTS). */
export const MAX_FRAME_BYTES = 128 * 1024 * 1024;
/** Byte ranges (blobs, optimizer state) travel in chunks far below the frame cap so a slow link
 *  still makes visible progress (protocol/pager.ts). */
export const CHUNK_BYTES = 8 * 1024 * 1024;
/** @deprecated the pager's CHUNK_BYTES */
export const BLOB_CHUNK_BYTES = CHUNK_BYTES;
/** Tensor lists (gradients, adapters) travel in pages of at most this many bytes and tensors
 *  (protocol/pager.ts); a LoRA tensor of an 8B model is at most ~1 MB. */
export const PAGE_BYTES = 32 * 1024 * 1024;
export const PAGE_TENSORS = 64;
/** Tensors are bounded by element count as well, so a small frame cannot claim a huge shape. */
export const MAX_TENSOR_ELEMENTS = 32 * 1024 * 1024;
export const MAX_TENSOR_RANK = 4;
/** A hop (stage-to-stage tensor stream, protocol/hop.ts) moves its tensor in chunks of at most this
 *  many elements (4 MiB in f32; a multiple of INT8_BLOCK so int8 blocks never straddle chunks):
 *  neither the frame cap nor the element cap limits a micro-batch's activation. */
export const HOP_CHUNK_ELEMENTS = 1 << 20;
/** Chunks a hop sender may have unacknowledged: the receiver buffers at most this many frames
 *  (16 MiB in f32) besides the tensor it assembles, whatever the link or the sender does. */
export const HOP_CREDIT = 4;
/** The largest frame on a hop stream: one chunk in f32 plus msgpack headers. */
export const HOP_FRAME_BYTES = HOP_CHUNK_ELEMENTS * 4 + 64 * 1024;
/** A hop tensor holds at most this many elements (2^31: 4 × 4096 tokens at hidden 131072; the
 *  receiver allocates exactly the shape the coordinator's control message named, never what a
 *  sender claims). */
export const MAX_HOP_ELEMENTS = 2 ** 31 - 1;
/** A hop stream that reaches a stage before the coordinator's control message for that attempt
 *  waits this long for it (unread: credit is granted only once the sender is known to be the one
 *  the route names), then is refused. */
export const HOP_EXPECT_WAIT_MS = 30_000;
/** After the first failure of a micro-batch attempt the coordinator waits this long for the other
 *  stages' reports before cancelling them (a receiver's bad-tensor report outranks the sender's
 *  "refused" and the hop failures it causes). */
export const REPORT_GRACE_MS = 2000;

/** Screens of activations and activation gradients (protocol/screen.ts), applied by whoever
 *  receives one: an RMS over this multiple of the median of recent accepted ones is refused … */
export const SCREEN_FACTOR = 50;
/** … the recent RMS values kept per (kind, sending stage) … */
export const OUTPUT_HISTORY = 64;
/** … and how many must be seen before the RMS screen judges (a median of fewer says little). */
export const OUTPUT_HISTORY_MIN = 8;

/** Elements per absmax block of the int8 wire codec. */
export const INT8_BLOCK = 64;
export const MAX_STRING_LENGTH = 4096;
export const MAX_ARRAY_LENGTH = 100_000;

export const HEARTBEAT_INTERVAL_MS = 1000;
/** A peer that misses heartbeats this long is dropped from routes. */
export const HEARTBEAT_TIMEOUT_MS = 5000;
/** A heartbeat must be answered within this, even by a peer in the middle of a large stage. */
export const HEARTBEAT_REPLY_MS = 200;
export const DIAL_TIMEOUT_MS = 10_000;
/** Default per-request timeout for compute requests (forward/backward on a large CPU stage can be slow). */
export const COMPUTE_TIMEOUT_MS = 600_000;
export const CONTROL_TIMEOUT_MS = 30_000;
export const BLOB_TIMEOUT_MS = 120_000;
/** A blob fetch asks at most this many providers at once (protocol/blobs.ts)... */
export const BLOB_MAX_PEERS = 8;
/** ...with this many chunk requests in flight to each, so a provider's link never idles for a round trip. */
export const BLOB_PEER_PARALLEL = 2;
