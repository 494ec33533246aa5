// A client of one cellmux kernel: the handshake, requests and replies,
// stdin, control requests, kernel state. Output for requests this client
// made goes to the handlers given with them; everything else (other
// clients' work, seen by collaborators and observers) goes to onForeign.

import {
  Channel, Socket, controlFrame, decodeFrame, encodeFrame, jupyterParts, newId, partJSON,
} from './frames.js';
import { LongPollTransport, WebSocketTransport } from './transport.js';
import { WidgetBridge } from './widgets/bridge.js';

// Close codes after which reconnecting is pointless (docs/protocol.md 10).
const FINAL_CLOSE = new Set([1002, 1003, 4000, 4403, 4404]);

export class KernelClient {
  // session and cursor: resume an earlier page's session (reload.js).
  constructor({ server = '', kernelId, token = null, transport = 'auto', session = null, cursor = null }) {
    this.server = server.replace(/\/$/, '');
    this.kernelId = kernelId;
    this.token = token;
    this.mode = transport;
    this.session = session || newId();
    this.seq = cursor;
    this.welcomed = false;
    this.role = null;
    this.state = 'starting';
    this.cause = null;
    this.requests = new Map(); // msg_id -> handlers
    this.controls = new Map(); // control id -> {resolve, reject}
    this.listeners = { status: [], foreign: [], files: [], notice: [], close: [], comm: [], welcome: [], frame: [], answered: [] };
    this.nextControl = 1;
    this.transport = null;
    this.closed = false;
    this.retries = 0;
    this.widgets = new WidgetBridge(this);
  }

  // Listen to an event; returns the function that stops listening.
  on(event, fn) {
    this.listeners[event].push(fn);
    return () => { this.listeners[event] = this.listeners[event].filter((f) => f !== fn); };
  }

  _emit(event, ...args) {
    for (const fn of this.listeners[event]) {
      try { fn(...args); } catch (e) { console.error(e); }
    }
  }

  connect() {
    return new Promise((resolve, reject) => {
      this._welcomed = { resolve, reject };
      const kind = this.mode === 'longpoll' ? 'longpoll' : 'websocket';
      this._open(kind);
    });
  }

  _open(kind) {
    const Transport = kind === 'longpoll' ? LongPollTransport : WebSocketTransport;
    // The kernel in the URL too: a proxy in front of several servers routes by it.
    const transport = new Transport(this.server, this.token, this.kernelId);
    this.transport = transport;
    transport.onframe = (data) => this._frame(data);
    transport.onclose = (info) => this._transportClosed(transport, info);
    const hello = { op: 'hello', version: 1, kernel: this.kernelId, session: this.session };
    if (this.seq !== null) hello.cursor = this.seq;
    transport.open(controlFrame(hello));
  }

  _transportClosed(transport, { code, reason, opened }) {
    if (this.closed || transport !== this.transport) return;
    if (!opened && !this.welcomed && transport.kind === 'websocket' && this.mode === 'auto') {
      // Websockets are blocked somewhere on the way: fall back, for good.
      this.mode = 'longpoll';
      this._emit('notice', 'websocket unavailable; using long polling');
      this._open('longpoll');
      return;
    }
    if (FINAL_CLOSE.has(code) || (!opened && !this.welcomed)) {
      this.closed = true;
      if (this._welcomed) { this._welcomed.reject(new Error(reason || `closed (${code})`)); this._welcomed = null; }
      this._setState('dead', code === 4000 ? reason : this.cause || reason || `connection closed (${code})`);
      this._emit('close', code, reason);
      return;
    }
    // A dropped connection: come back where we were (the server replays).
    // A network that is away for a while: keep trying, more slowly (at most every 10 s).
    if (opened) this.retries = 0;
    if (this.retries === 0) this._emit('notice', 'connection lost; reconnecting');
    const delay = Math.min(1000 * 2 ** this.retries, 10000);
    this.retries += 1;
    setTimeout(() => { if (!this.closed) this._open(transport.kind); }, delay);
  }

  close() {
    this.closed = true;
    if (this.transport) this.transport.close();
  }

  _setState(state, cause = null) {
    this.state = state;
    this.cause = cause;
    this._emit('status', state, cause);
  }

  _frame(data) {
    const frame = decodeFrame(data);
    if (frame.channel === Channel.CONTROL) { this._control(partJSON(frame.parts[0])); return; }
    if (frame.seq) this.seq = Math.max(this.seq || 0, frame.seq);
    if (frame.parts.length < 4) return;
    const header = partJSON(frame.parts[0]);
    const parent = partJSON(frame.parts[1]);
    const metadata = partJSON(frame.parts[2]);
    const content = partJSON(frame.parts[3]);
    const msg = { channel: frame.channel, header, parent, metadata, content, buffers: frame.parts.slice(4) };
    this._emit('frame', frame.seq);
    if (frame.channel === Channel.COMM && header.msg_type !== 'comm_info_reply') { this._emit('comm', msg); return; }
    // Output an Output widget captures goes there, not to the cell.
    if (this.widgets.capture(msg)) return;
    // An introspection request's busy/idle is not the kernel's state.
    if (frame.channel === Channel.STATUS && header.msg_type === 'status' && !content.cellmux_introspection) {
      const s = content.execution_state;
      this._setState(s, content.cause || null);
    }
    if (frame.channel === Channel.FILES) { this._emit('files', content); return; }
    const handlers = this.requests.get(parent.msg_id);
    if (handlers) { handlers.message(msg); return; }
    if (frame.channel !== Channel.STATUS) this._emit('foreign', msg);
  }

  _control(body) {
    if (body.op === 'welcome') {
      this.role = body.role || 'owner';
      if (this.seq === null) this.seq = body.seq;
      this.welcomed = true;
      this.retries = 0;
      this._emit('welcome', body);
      const k = body.kernel || {};
      this._setState(k.execution_state || 'idle', k.reason || null);
      if (this._welcomed) { this._welcomed.resolve(body); this._welcomed = null; }
      return;
    }
    if (body.op === 'gap') { this._emit('notice', `${body.missed} messages were lost`); return; }
    const pending = body.id !== undefined && body.id !== null ? this.controls.get(body.id) : null;
    if (pending) {
      this.controls.delete(body.id);
      if (body.op === 'error') pending.reject(Object.assign(new Error(body.message), { code: body.code }));
      else pending.resolve(body);
      return;
    }
    if (body.op === 'error') {
      if (this._welcomed && body.fatal) {
        this._welcomed.reject(Object.assign(new Error(body.message), { code: body.code }));
        this._welcomed = null;
      }
      this._emit('notice', `error: ${body.message}`);
    }
  }

  request(op, extra = {}) {
    const id = this.nextControl++;
    return new Promise((resolve, reject) => {
      this.controls.set(id, { resolve, reject });
      this.transport.send(controlFrame({ op, id, ...extra }));
    });
  }

  interrupt() { return this.request('interrupt'); }
  restart() { return this.request('restart'); }

  // Send a Jupyter request; handlers.message(msg) gets every message whose
  // parent is it. Returns the msg_id.
  send(channel, socket, msgType, content, handlers, parent = {}) {
    return this.sendMessage(channel, socket, msgType, content, { handlers, parent });
  }

  // send() with a chosen msg_id, metadata and binary buffers (comm messages).
  sendMessage(channel, socket, msgType, content, { handlers = null, parent = {}, msgId = null, metadata = {}, buffers = [] } = {}) {
    const { header, parts } = jupyterParts(msgType, content, this.session, parent, { msgId, metadata, buffers });
    if (handlers) this.requests.set(header.msg_id, handlers);
    this.transport.send(encodeFrame(channel, socket, parts));
    return header.msg_id;
  }

  // Run code. cb: {output(msg), input(prompt, password) -> Promise<string>}.
  // Resolves with the execute_reply content once the kernel is idle again.
  execute(code, cb) {
    return new Promise((resolve) => {
      let reply = null;
      let idle = false;
      const asked = new Set();
      let msgId;
      let off = () => {};
      const done = () => {
        if (reply && idle) { off(); this.requests.delete(msgId); resolve(reply); }
      };
      msgId = this.send(Channel.EXECUTE, Socket.SHELL, 'execute_request', {
        code, silent: false, store_history: true, user_expressions: {},
        allow_stdin: true, stop_on_error: true,
      }, {
        message: (msg) => {
          const type = msg.header.msg_type;
          if (type === 'execute_reply') { reply = msg.content; done(); return; }
          if (type === 'status') {
            if (msg.content.execution_state === 'idle') { idle = true; done(); }
            return;
          }
          if (type === 'input_request') {
            // A reconnect may bring a waiting prompt again: ask once.
            if (asked.has(msg.header.msg_id)) return;
            asked.add(msg.header.msg_id);
            Promise.resolve(cb.input(msg.content.prompt, !!msg.content.password)).then((value) => {
              if (value === null) return; // the prompt was withdrawn
              this._emit('answered', msg.header.msg_id);
              this.send(Channel.STDIN, Socket.STDIN, 'input_reply', { value, status: 'ok' }, null, msg.header);
            });
            return;
          }
          cb.output(msg);
        },
      });
      // A dead or restarted kernel never answers: stop waiting then.
      const stop = (state) => {
        if (state === 'dead' || state === 'restarting') {
          off();
          this.requests.delete(msgId);
          resolve(reply || { status: 'aborted' });
        }
      };
      off = this.on('status', stop);
    });
  }

  // complete_request / inspect_request: resolve with the reply content.
  ask(msgType, content) {
    return new Promise((resolve) => {
      const msgId = this.send(Channel.INTROSPECTION, Socket.SHELL, msgType, content, {
        message: (msg) => {
          if (msg.header.msg_type.endsWith('_reply')) { this.requests.delete(msgId); resolve(msg.content); }
        },
      });
      setTimeout(() => { if (this.requests.delete(msgId)) resolve(null); }, 10000);
    });
  }

  complete(code, cursor) { return this.ask('complete_request', { code, cursor_pos: cursor }); }
  inspect(code, cursor) { return this.ask('inspect_request', { code, cursor_pos: cursor, detail_level: 0 }); }
}
