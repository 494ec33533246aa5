// Two ways to carry frames: a websocket (/ws) or long polling (/poll).
// Both take the hello frame in open() and call
//   onframe(bytes), onclose({code, reason, opened})
// so the kernel client does not know which one it has.

import { packFrames, unpackFrames, decodeFrame, partJSON } from './frames.js';

function withToken(url, token) {
  if (!token) return url;
  return url + (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token);
}

// The kernel the hello names, in the URL as well (?kernel=ID): a proxy in
// front of several servers cannot read the hello, only the URL.
function withKernel(url, kernelId) {
  return kernelId ? url + '?kernel=' + encodeURIComponent(kernelId) : url;
}

export class WebSocketTransport {
  constructor(base, token, kernelId) {
    this.kind = 'websocket';
    this.url = withToken(withKernel(base.replace(/^http/, 'ws') + '/ws', kernelId), token);
    this.onframe = () => {};
    this.onclose = () => {};
    this.ws = null;
  }

  open(hello) {
    let opened = false;
    const ws = new WebSocket(this.url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onopen = () => { opened = true; ws.send(hello); };
    ws.onmessage = (event) => {
      if (typeof event.data !== 'string') this.onframe(new Uint8Array(event.data));
    };
    ws.onclose = (event) => {
      if (this.ws === ws) this.onclose({ code: event.code, reason: event.reason, opened });
    };
  }

  send(bytes) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes);
  }

  close() {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000);
  }
}

export class LongPollTransport {
  constructor(base, token, kernelId) {
    this.kind = 'longpoll';
    this.base = base + '/poll';
    this.kernelId = kernelId;
    this.token = token;
    this.onframe = () => {};
    this.onclose = () => {};
    this.connection = null;
    this.closed = false;
    this.outbox = [];
    this.posting = false;
    this.seq = null;
    this.ctl = 0;
  }

  _fetch(url, init = {}) {
    const headers = { ...(init.headers || {}) };
    if (this.token) headers.authorization = 'token ' + this.token;
    return fetch(url, { ...init, headers, credentials: 'same-origin', cache: 'no-store' });
  }

  async open(hello) {
    let response;
    try {
      response = await this._fetch(withKernel(this.base, this.kernelId), {
        method: 'POST', body: packFrames([hello]),
        headers: { 'content-type': 'application/octet-stream' },
      });
    } catch (e) {
      this._closed(1006, String(e), false);
      return;
    }
    if (!response.ok) {
      this._closed(response.status === 403 ? 4403 : 1006, response.statusText, false);
      return;
    }
    this.connection = (await response.json()).connection;
    this._flush();
    this._loop();
  }

  async _loop() {
    let failures = 0;
    while (!this.closed) {
      const params = new URLSearchParams({ ctl: String(this.ctl) });
      if (this.seq !== null) params.set('seq', String(this.seq));
      let response;
      try {
        response = await this._fetch(`${this.base}/${this.connection}?${params}`);
      } catch (e) {
        if (++failures > 5) { this._closed(1006, 'the server cannot be reached', true); return; }
        await new Promise((r) => setTimeout(r, 500 * failures));
        continue;
      }
      if (!response.ok) {
        this._closed(response.status === 404 || response.status === 410 ? 4408 : 1006,
          response.statusText, true);
        return;
      }
      failures = 0;
      const frames = unpackFrames(await response.arrayBuffer());
      this.seq = Number(response.headers.get('cellmux-seq'));
      this.ctl = Number(response.headers.get('cellmux-ctl'));
      for (const data of frames) {
        const frame = decodeFrame(data);
        if (frame.channel === 0) {
          const body = partJSON(frame.parts[0]);
          if (body.op === 'close') { this._closed(body.code, body.reason, true); return; }
        }
        this.onframe(data);
      }
    }
  }

  send(bytes) {
    if (this.closed) return;
    this.outbox.push(bytes);
    this._flush();
  }

  // One POST at a time, so the server sees frames in the order they were sent.
  async _flush() {
    if (this.posting || !this.connection) return;
    this.posting = true;
    while (this.outbox.length && !this.closed) {
      const batch = this.outbox.splice(0);
      try {
        await this._fetch(`${this.base}/${this.connection}`, {
          method: 'POST', body: packFrames(batch),
          headers: { 'content-type': 'application/octet-stream' },
        });
      } catch (e) {
        this.outbox.unshift(...batch);
        await new Promise((r) => setTimeout(r, 500));
      }
    }
    this.posting = false;
  }

  _closed(code, reason, opened) {
    if (this.closed) return;
    this.closed = true;
    this.onclose({ code, reason, opened });
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.connection) this._fetch(`${this.base}/${this.connection}`, { method: 'DELETE' }).catch(() => {});
  }
}
