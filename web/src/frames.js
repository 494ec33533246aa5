// The cellmux frame format (docs/protocol.md section 2) and Jupyter
// message parts (section 4). No I/O here.

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export const Channel = Object.freeze({
  CONTROL: 0, STDIN: 1, STDOUT: 2, STDERR: 3, STATUS: 4, INTROSPECTION: 5,
  EXECUTE: 6, DISPLAY: 7, COMM: 8, FILES: 9, KERNEL: 10,
});
export const Socket = Object.freeze({ NONE: 0, SHELL: 1, IOPUB: 2, STDIN: 3, CONTROL: 4 });

const HEADER = 16;

export function encodeFrame(channel, socket, parts) {
  const bytes = parts.map((p) => (typeof p === 'string' ? encoder.encode(p) : p));
  const size = HEADER + 4 * bytes.length + bytes.reduce((n, b) => n + b.length, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setUint16(0, channel);
  view.setUint8(2, socket);
  view.setUint32(12, bytes.length);
  let offset = HEADER + 4 * bytes.length;
  bytes.forEach((b, i) => {
    view.setUint32(HEADER + 4 * i, b.length);
    out.set(b, offset);
    offset += b.length;
  });
  return out;
}

export class FrameError extends Error {}

export function decodeFrame(buffer) {
  const data = buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.length < HEADER) throw new FrameError('frame shorter than its header');
  const n = view.getUint32(12);
  if (data.length < HEADER + 4 * n) throw new FrameError('frame ends in its length table');
  const parts = [];
  let offset = HEADER + 4 * n;
  for (let i = 0; i < n; i++) {
    const len = view.getUint32(HEADER + 4 * i);
    if (offset + len > data.length) throw new FrameError('frame parts overrun it');
    parts.push(data.subarray(offset, offset + len));
    offset += len;
  }
  // seq is a uint64; kernels never get near 2**53 frames.
  const seq = view.getUint32(4) * 2 ** 32 + view.getUint32(8);
  return { channel: view.getUint16(0), socket: view.getUint8(2), seq, parts };
}

export function controlFrame(body) {
  return encodeFrame(Channel.CONTROL, Socket.NONE, [JSON.stringify(body)]);
}

export function partJSON(part) {
  return JSON.parse(decoder.decode(part));
}

export function newId() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Math.random().toString(16).slice(2) + Date.now().toString(16);
}

// A Jupyter v5 message as the four parts of a data frame.
export function jupyterParts(msgType, content, session, parent = {}, { msgId = null, metadata = {}, buffers = [] } = {}) {
  const header = {
    msg_id: msgId || newId(), msg_type: msgType, session, username: 'browser',
    date: new Date().toISOString(), version: '5.3',
  };
  const parts = [JSON.stringify(header), JSON.stringify(parent), JSON.stringify(metadata), JSON.stringify(content)];
  return { header, parts: [...parts, ...buffers] };
}

// Long polling carries frames back to back, each after its uint32 length.
export function packFrames(frames) {
  const size = frames.reduce((n, f) => n + 4 + f.length, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  let offset = 0;
  for (const f of frames) {
    view.setUint32(offset, f.length);
    out.set(f, offset + 4);
    offset += 4 + f.length;
  }
  return out;
}

export function unpackFrames(buffer) {
  const data = new Uint8Array(buffer);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const frames = [];
  let offset = 0;
  while (offset + 4 <= data.length) {
    const n = view.getUint32(offset);
    frames.push(data.subarray(offset + 4, offset + 4 + n));
    offset += 4 + n;
  }
  return frames;
}
