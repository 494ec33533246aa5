// The page's side of Jupyter widgets: one WidgetBridge per kernel client.
//
// Widget views run in widget frames (./frame.js, served as
// /static/widgets.html in <iframe sandbox="allow-scripts">: an opaque
// origin, so kernel-supplied widget code never sees this page's DOM,
// cookies or storage). The bridge
//  - keeps the state of every open widget comm (target "jupyter.widget"),
//    so a frame made later (a new display, a reloaded page) starts from it;
//  - relays the kernel's comm_open / comm_msg / comm_close on those comms to
//    the frames, and a frame's comm_msg / comm_close on those comms (and only
//    those: no other message type, no other comm) to the kernel;
//  - captures the kernel's output into Output widgets (a frontend's job in
//    the widget protocol: output whose parent is an Output widget's msg_id
//    goes into that widget's outputs instead of the cell).
// Bounds: at most MAX_MODELS open widget comms and MAX_OUTPUTS outputs per
// Output widget are kept; what is beyond is dropped (with a notice).

import { Channel, Socket } from '../frames.js';

export const WIDGET_VIEW_MIME = 'application/vnd.jupyter.widget-view+json';
const TARGET = 'jupyter.widget';
const CONTROL_TARGET = 'jupyter.widget.control';
const STATE_WAIT_MS = 10000; // how long a frame waits for the kernel's widget states
export const MAX_MODELS = 10000;
export const MAX_OUTPUTS = 1000;
const MAX_FRAME_MESSAGE = 16 * 1024 * 1024; // bytes of JSON and buffers a frame may send at once
const OUTPUT_TYPES = new Set(['stream', 'display_data', 'execute_result', 'error', 'clear_output']);

// A part as an ArrayBuffer of its own (parts are views into a frame).
function ownBuffer(part) {
  return part.buffer.slice(part.byteOffset, part.byteOffset + part.byteLength);
}

function putBuffers(state, paths, buffers) {
  paths.forEach((path, i) => {
    if (!Array.isArray(path) || !path.length || buffers[i] === undefined) return;
    let obj = state;
    for (const key of path.slice(0, -1)) {
      if (obj === null || typeof obj !== 'object') return;
      obj = obj[key];
    }
    if (obj !== null && typeof obj === 'object') obj[path[path.length - 1]] = new DataView(buffers[i]);
  });
}

function messageSize(m) {
  let n = 0;
  try { n = JSON.stringify({ data: m.data, metadata: m.metadata }).length; } catch (e) { return Infinity; }
  for (const b of m.buffers || []) n += b.byteLength || 0;
  return n;
}

// A kernel output message as an nbformat output (what Output widgets hold).
function asOutput(msg) {
  const c = msg.content;
  switch (msg.header.msg_type) {
    case 'stream': return { output_type: 'stream', name: c.name, text: c.text };
    case 'display_data': return { output_type: 'display_data', data: c.data || {}, metadata: c.metadata || {} };
    case 'execute_result':
      return { output_type: 'execute_result', data: c.data || {}, metadata: c.metadata || {}, execution_count: c.execution_count };
    case 'error': return { output_type: 'error', ename: c.ename, evalue: c.evalue, traceback: c.traceback || [] };
    default: return null;
  }
}

export class WidgetBridge {
  constructor(kernel) {
    this.kernel = kernel;
    this.models = new Map(); // comm id -> {comm_id, target_name, state, metadata}
    this.frames = new Set(); // {iframe, area, ready}
    this.captures = new Map(); // msg id -> comm ids of Output widgets capturing it
    this.pendingClear = new Set(); // Output widgets with a clear_output(wait=True) pending
    this.warned = false;
    this.control = null; // {commId, timer} while the kernel's widget states are asked for
    this.outstanding = new Set(); // ids of frames' messages whose idle has not come
    kernel.on('comm', (msg) => this._kernelComm(msg));
    // A restarted kernel has none of the old widgets: forget them.
    kernel.on('status', (state) => {
      if (state === 'restarting') { this.models.clear(); this.captures.clear(); this.pendingClear.clear(); }
      if (state === 'restarting' || state === 'dead') {
        // No idle will come for what the frames sent: stop waiting for it.
        for (const id of this.outstanding) this.kernel.requests.delete(id);
        this.outstanding.clear();
      }
    });
    window.addEventListener('message', (event) => this._frameMessage(event));
  }

  get frameURL() { return `${this.kernel.server || ''}/static/widgets.html`; }

  // -- the kernel's side ---------------------------------------------------

  _kernelComm(msg) {
    const type = msg.header.msg_type;
    const c = msg.content || {};
    const buffers = msg.buffers.map(ownBuffer);
    if (type === 'comm_open') {
      if (c.target_name !== TARGET) return;
      if (this.models.size >= MAX_MODELS && !this.models.has(c.comm_id)) {
        if (!this.warned) this.kernel._emit('notice', `more than ${MAX_MODELS} widgets: newer ones are not shown`);
        this.warned = true;
        return;
      }
      const data = c.data || {};
      const state = { ...(data.state || {}) };
      putBuffers(state, data.buffer_paths || [], buffers);
      this.models.set(c.comm_id, { comm_id: c.comm_id, target_name: c.target_name, state, metadata: msg.metadata || {} });
      this._watchOutput(c.comm_id, state);
    } else if (this.control && c.comm_id === this.control.commId) {
      if (type === 'comm_msg' && c.data && c.data.method === 'update_states') this._states(c.data, buffers);
      if (type === 'comm_msg' || type === 'comm_close') this._statesDone(type !== 'comm_close');
      return;
    } else if (type === 'comm_msg') {
      const model = this.models.get(c.comm_id);
      if (!model) return;
      const data = c.data || {};
      if ((data.method === 'update' || data.method === 'echo_update') && data.state) {
        const state = { ...data.state };
        putBuffers(state, data.buffer_paths || [], buffers);
        Object.assign(model.state, state);
        this._watchOutput(c.comm_id, state);
      }
    } else if (type === 'comm_close') {
      if (!this.models.delete(c.comm_id)) return;
      for (const [id, owners] of this.captures) {
        owners.delete(c.comm_id);
        if (!owners.size) this.captures.delete(id);
      }
    } else {
      return;
    }
    const copy = { header: msg.header, parent_header: msg.parent, metadata: msg.metadata || {}, content: c, buffers };
    for (const f of this._liveFrames()) f.iframe.contentWindow.postMessage({ cellmuxWidget: { op: 'kernel', msg: copy } }, '*');
  }

  // An Output widget's msg_id says whose output it captures.
  _watchOutput(commId, changed) {
    if (!('msg_id' in changed)) return;
    for (const [id, owners] of this.captures) {
      owners.delete(commId);
      if (!owners.size) this.captures.delete(id);
    }
    if (changed.msg_id) {
      if (!this.captures.has(changed.msg_id)) this.captures.set(changed.msg_id, new Set());
      this.captures.get(changed.msg_id).add(commId);
    }
  }

  // Called by the kernel client for every output message first: true if an
  // Output widget took it (it then does not go to the cell).
  capture(msg) {
    if (!OUTPUT_TYPES.has(msg.header.msg_type)) return false;
    const owners = this.captures.get(msg.parent && msg.parent.msg_id);
    if (!owners) return false;
    for (const commId of owners) this._appendOutput(commId, msg);
    return true;
  }

  _appendOutput(commId, msg) {
    const model = this.models.get(commId);
    if (!model) return;
    let outputs = Array.isArray(model.state.outputs) ? model.state.outputs : [];
    if (msg.header.msg_type === 'clear_output') {
      if (msg.content.wait) this.pendingClear.add(commId); else outputs = [];
    } else {
      if (this.pendingClear.delete(commId)) outputs = [];
      const out = asOutput(msg);
      const last = outputs[outputs.length - 1];
      if (out.output_type === 'stream' && last && last.output_type === 'stream' && last.name === out.name) {
        outputs = [...outputs.slice(0, -1), { ...last, text: last.text + out.text }];
      } else {
        outputs = [...outputs, out].slice(-MAX_OUTPUTS);
      }
    }
    model.state.outputs = outputs;
    // The frames learn it as if the kernel had updated the model.
    const update = {
      header: { msg_id: `cellmux-capture-${Date.now()}`, msg_type: 'comm_msg', session: 'cellmux-page' },
      parent_header: {}, metadata: {}, buffers: [],
      content: { comm_id: commId, data: { method: 'update', state: { outputs }, buffer_paths: [] } },
    };
    for (const f of this._liveFrames()) f.iframe.contentWindow.postMessage({ cellmuxWidget: { op: 'kernel', msg: update } }, '*');
  }

  // -- the frames' side ------------------------------------------------------

  _liveFrames() {
    const live = [];
    for (const f of this.frames) {
      if (!f.iframe.isConnected) { this.frames.delete(f); continue; }
      if (f.ready) live.push(f);
    }
    return live;
  }

  // A frame showing the widget model_id, for an output area.
  view(modelId, area) {
    const iframe = document.createElement('iframe');
    // allow-scripts WITHOUT allow-same-origin: an opaque origin.
    iframe.setAttribute('sandbox', 'allow-scripts');
    iframe.className = 'cellmux-frame cellmux-widget-frame';
    iframe.dataset.model = modelId;
    iframe.src = this.frameURL;
    this._liveFrames(); // forget frames no longer shown
    this.frames.add({ iframe, area, ready: false, view: modelId });
    return iframe;
  }

  _init(frame) {
    frame.waiting = false;
    if (!frame.iframe.isConnected) return;
    const models = [...this.models.values()];
    frame.iframe.contentWindow.postMessage({ cellmuxWidget: { op: 'init', models, view: frame.view } }, '*');
  }

  // ipywidgets' control comm: request_states answers with every widget's state.
  _requestStates() {
    if (this.control) return;
    const commId = `cellmux-control-${Date.now()}-${Math.random().toString(16).slice(2)}`;
    this.control = { commId, timer: setTimeout(() => this._statesDone(true), STATE_WAIT_MS) };
    const comm = { comm_id: commId, target_name: CONTROL_TARGET, data: {} };
    this.kernel.sendMessage(Channel.COMM, Socket.SHELL, 'comm_open', comm, { metadata: { version: '1.0.0' } });
    this.kernel.sendMessage(Channel.COMM, Socket.SHELL, 'comm_msg', { comm_id: commId, data: { method: 'request_states' } });
  }

  _states(data, buffers) {
    const states = data.states && typeof data.states === 'object' ? data.states : {};
    // buffer_paths start with the model id: [id, ...path in its state]
    const perModel = new Map();
    (data.buffer_paths || []).forEach((path, i) => {
      if (!Array.isArray(path) || path.length < 2) return;
      if (!perModel.has(path[0])) perModel.set(path[0], { paths: [], buffers: [] });
      perModel.get(path[0]).paths.push(path.slice(1));
      perModel.get(path[0]).buffers.push(buffers[i]);
    });
    for (const [id, entry] of Object.entries(states)) {
      if (this.models.has(id) || !entry || typeof entry.state !== 'object') continue;
      if (this.models.size >= MAX_MODELS) break;
      const state = { ...entry.state };
      const b = perModel.get(id);
      if (b) putBuffers(state, b.paths, b.buffers);
      const model = { comm_id: id, target_name: TARGET, state, metadata: { version: '2.1.0' } };
      this.models.set(id, model);
      this._watchOutput(id, state);
      const open = {
        header: { msg_id: `cellmux-state-${id}`, msg_type: 'comm_open', session: 'cellmux-page' },
        parent_header: {}, metadata: model.metadata, buffers: [],
        content: { comm_id: id, target_name: TARGET, data: { state, buffer_paths: [] } },
      };
      for (const f of this._liveFrames()) if (!f.waiting) f.iframe.contentWindow.postMessage({ cellmuxWidget: { op: 'kernel', msg: open } }, '*');
    }
  }

  _statesDone(closeComm) {
    const control = this.control;
    if (!control) return;
    this.control = null;
    clearTimeout(control.timer);
    if (closeComm) this.kernel.sendMessage(Channel.COMM, Socket.SHELL, 'comm_close', { comm_id: control.commId, data: {} });
    for (const f of this._liveFrames()) if (f.waiting) this._init(f);
  }

  _frameMessage(event) {
    const m = event.data && event.data.cellmuxWidget;
    if (!m || typeof m !== 'object') return;
    let frame = null;
    for (const f of this.frames) if (f.iframe.contentWindow === event.source) frame = f;
    if (!frame) return; // not one of ours: ignore it
    if (m.op === 'ready') {
      frame.ready = true;
      // A widget made before this page saw its comm_open (another page, a
      // session before a reload): ask the kernel for every widget's state first.
      if (this.models.has(frame.view)) this._init(frame);
      else { frame.waiting = true; this._requestStates(); }
      return;
    }
    if (!frame.ready || (m.op !== 'send' && m.op !== 'close')) return;
    if (this.kernel.role === 'observer') return; // read-only: the server would refuse it anyway
    // Only messages on open widget comms, with a fresh id, of bounded size.
    if (typeof m.comm_id !== 'string' || !this.models.has(m.comm_id)) return;
    if (typeof m.msg_id !== 'string' || m.msg_id.length > 100 || this.kernel.requests.has(m.msg_id)) return;
    if (m.data === null || typeof m.data !== 'object' || Array.isArray(m.data)) return;
    const buffers = Array.isArray(m.buffers) ? m.buffers.filter((b) => b instanceof ArrayBuffer) : [];
    if (messageSize({ data: m.data, metadata: m.metadata, buffers }) > MAX_FRAME_MESSAGE) return;
    const type = m.op === 'send' ? 'comm_msg' : 'comm_close';
    const handlers = {
      message: (msg) => {
        const kind = msg.header.msg_type;
        const channel = kind.endsWith('_reply') ? 'shell' : 'iopub';
        if (channel === 'iopub' && frame.area && OUTPUT_TYPES.has(kind)) {
          // Output of a widget's callback that no Output widget captures:
          // show it under the widget rather than lose it.
          frame.area.message(msg);
        }
        if (frame.iframe.isConnected) {
          const copy = { header: msg.header, parent_header: msg.parent, metadata: {}, content: msg.content, buffers: [] };
          frame.iframe.contentWindow.postMessage({ cellmuxWidget: { op: 'reply', msg_id: m.msg_id, channel, msg: copy } }, '*');
        }
        if (kind === 'status' && msg.content.execution_state === 'idle') {
          this.kernel.requests.delete(m.msg_id);
          this.outstanding.delete(m.msg_id);
        }
      },
    };
    this.outstanding.add(m.msg_id);
    this.kernel.sendMessage(Channel.COMM, Socket.SHELL, type, { comm_id: m.comm_id, data: m.data }, {
      handlers, msgId: m.msg_id, metadata: (m.metadata && typeof m.metadata === 'object') ? m.metadata : {}, buffers: buffers.map((b) => new Uint8Array(b)),
    });
    if (type === 'comm_close') this.models.delete(m.comm_id);
  }
}
