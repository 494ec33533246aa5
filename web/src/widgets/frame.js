// The widget frame: runs inside <iframe sandbox="allow-scripts"> (an opaque
// origin), loaded from /static/widgets.html. It renders one widget view with
// the maintained renderer (@jupyter-widgets/html-manager) and talks to the
// kernel only through postMessage to the page that made it (the bridge in
// ./bridge.js), which relays comm messages of widget comms and nothing else.
// Kernel-supplied widget code and HTML run here, never in the page's origin.

import { HTMLManager } from '@jupyter-widgets/html-manager';
import '@fortawesome/fontawesome-free/css/all.min.css';
import '@fortawesome/fontawesome-free/css/v4-shims.min.css';
import '@lumino/widgets/style/index.css';
import '@jupyter-widgets/controls/css/widgets-base.css';
import './frame.css';

const PROTOCOL_VERSION = '2.1.0';

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(16).slice(2) + Date.now().toString(16);
}

function post(message) {
  // The page checks the sender (our window), not our origin: ours is opaque.
  parent.postMessage({ cellmuxWidget: message }, '*');
}

// A comm that lives in the page's bridge: what widget models send goes out
// by postMessage; what the kernel sends comes back by dispatch().
class FrameComm {
  constructor(registry, commId, targetName) {
    this.registry = registry;
    this.comm_id = commId;
    this.target_name = targetName;
    this._onMsg = null;
    this._onClose = null;
    this._queue = []; // kernel messages that arrived before the model listened
  }

  open() { throw new Error('widget frames cannot open comms'); }

  send(data, callbacks, metadata, buffers) {
    const msgId = newId();
    if (callbacks) this.registry.pending.set(msgId, callbacks);
    post({ op: 'send', comm_id: this.comm_id, msg_id: msgId, data, metadata: metadata || {}, buffers: plainBuffers(buffers) });
    return msgId;
  }

  close(data, callbacks) {
    const msgId = newId();
    if (callbacks) this.registry.pending.set(msgId, callbacks);
    post({ op: 'close', comm_id: this.comm_id, msg_id: msgId, data: data || {} });
    this.registry.frameComms.delete(this.comm_id);
    return msgId;
  }

  on_msg(fn) {
    this._onMsg = fn;
    for (const msg of this._queue.splice(0)) fn(msg);
  }

  on_close(fn) { this._onClose = fn; }

  dispatch(msg) {
    if (msg.header.msg_type === 'comm_close') {
      this.registry.frameComms.delete(this.comm_id);
      if (this._onClose) this._onClose(msg);
      return;
    }
    if (this._onMsg) this._onMsg(msg); else this._queue.push(msg);
  }
}

function plainBuffers(buffers) {
  return (buffers || []).map((b) => {
    if (b instanceof ArrayBuffer) return b;
    return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
  });
}

class FrameManager extends HTMLManager {
  constructor() {
    super();
    this.frameComms = new Map(); // comm id -> FrameComm
    this.pending = new Map(); // msg id we sent -> its widget callbacks
  }

  // Models are made from the kernel's comms only.
  _create_comm() { return Promise.reject(new Error('widget frames cannot open comms')); }

  _get_comm_info() { return Promise.resolve({}); }

  // Extra per-view callbacks for messages models send: none (the page
  // relays their replies to the callbacks each send() registers).
  callbacks() { return {}; }

  // Make models from the page's snapshot: every model is registered before
  // any is awaited, so references between them (IPY_MODEL_…) resolve in any order.
  openAll(models) {
    return Promise.allSettled(models.map((m) => this.openOne(m)));
  }

  openOne({ comm_id, target_name, state, metadata }) {
    if (this.frameComms.has(comm_id)) return Promise.resolve();
    const comm = new FrameComm(this, comm_id, target_name);
    this.frameComms.set(comm_id, comm);
    const version = (metadata && metadata.version) || PROTOCOL_VERSION;
    if (String(version).split('.', 1)[0] !== PROTOCOL_VERSION.split('.', 1)[0]) {
      return Promise.reject(new Error(`widget protocol ${version} is not supported`));
    }
    return this.new_model({
      model_name: state._model_name,
      model_module: state._model_module,
      model_module_version: state._model_module_version,
      model_id: comm_id,
      comm,
    }, state);
  }

  // A kernel message on a widget comm.
  kernelMessage(msg) {
    const type = msg.header.msg_type;
    if (type === 'comm_open') {
      const { comm_id, target_name, data } = msg.content;
      const state = { ...(data.state || {}) };
      putBuffers(state, data.buffer_paths || [], msg.buffers || []);
      this.openOne({ comm_id, target_name, state, metadata: msg.metadata }).catch((e) => console.error(e));
      return;
    }
    const comm = this.frameComms.get(msg.content.comm_id);
    if (comm) comm.dispatch(msg);
  }

  // A message whose parent is one we sent (status, replies, output).
  reply(msgId, channel, msg) {
    const callbacks = this.pending.get(msgId);
    if (!callbacks) return;
    const type = msg.header.msg_type;
    try {
      if (channel === 'shell' && callbacks.shell && callbacks.shell.reply) callbacks.shell.reply(msg);
      if (channel === 'iopub' && callbacks.iopub) {
        if (type === 'status' && callbacks.iopub.status) callbacks.iopub.status(msg);
        else if (type === 'clear_output' && callbacks.iopub.clear_output) callbacks.iopub.clear_output(msg);
        else if (type !== 'status' && callbacks.iopub.output) callbacks.iopub.output(msg);
      }
    } finally {
      if (type === 'status' && msg.content.execution_state === 'idle') this.pending.delete(msgId);
    }
  }
}

function putBuffers(state, paths, buffers) {
  paths.forEach((path, i) => {
    let obj = state;
    for (const key of path.slice(0, -1)) obj = obj[key];
    const b = buffers[i];
    obj[path[path.length - 1]] = b instanceof DataView ? b : new DataView(b instanceof ArrayBuffer ? b : b.buffer);
  });
}

const manager = new FrameManager();
const host = document.getElementById('widget');
let shown = false;

async function show(modelId) {
  if (shown) return;
  shown = true;
  try {
    const model = await manager.get_model(modelId);
    const view = await manager.create_view(model);
    await manager.display_view(view, host);
  } catch (e) {
    host.textContent = `cannot show this widget: ${e && e.message ? e.message : e}`;
    host.className = 'cellmux-widget-error';
  }
}

window.addEventListener('message', (event) => {
  if (event.source !== parent) return;
  const m = event.data && event.data.cellmuxWidget;
  if (!m || typeof m !== 'object') return;
  if (m.op === 'init') {
    manager.openAll(m.models).then(() => show(m.view));
  } else if (m.op === 'kernel') {
    manager.kernelMessage(m.msg);
  } else if (m.op === 'reply') {
    manager.reply(m.msg_id, m.channel, m.msg);
  }
});

// Our height, for the page to size the frame (nothing else crosses over).
function reportHeight() {
  parent.postMessage({ cellmuxFrameHeight: document.documentElement.scrollHeight }, '*');
}
new ResizeObserver(reportHeight).observe(document.body);

post({ op: 'ready' });
