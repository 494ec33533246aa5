// What makes the console reload-proof: its session id, where its history
// starts and how far it got, kept in sessionStorage (per tab, per kernel),
// and the input_requests it answered. A reloaded page says hello with the
// same session (so the server routes a waiting input() prompt to it) and
// with the cursor where this tab's history starts, so the server replays
// every cell of it, and whatever arrived while the page was away, into the
// fresh page (docs/browser.md, Reloads).

const PREFIX = 'cellmux:console:';
const MAX_ANSWERED = 100; // input_request ids remembered as answered
const SAVE_EVERY_MS = 500;

function load(key) {
  try {
    const value = JSON.parse(sessionStorage.getItem(key));
    return value && typeof value === 'object' ? value : null;
  } catch (e) {
    return null; // storage off (privacy mode) or garbage: start afresh
  }
}

export class SessionMemory {
  constructor(kernelId) {
    this.key = PREFIX + kernelId;
    const saved = load(this.key);
    this.saved = saved && typeof saved.session === 'string' ? saved : null;
    this.data = this.saved ? { ...this.saved } : { session: null, start: null, cursor: null, answered: [] };
    if (!Array.isArray(this.data.answered)) this.data.answered = [];
    this.timer = null;
    addEventListener('pagehide', () => this.save());
  }

  // Resuming: the session id and the cursor to say hello with (null: fresh).
  get session() { return this.saved ? this.saved.session : null; }

  get resumeCursor() {
    return this.saved && Number.isInteger(this.saved.start) ? this.saved.start : null;
  }

  // Follow a kernel client: its session, the first welcome's seq, every frame's seq.
  track(kernel) {
    this.data.session = kernel.session;
    kernel.on('welcome', (body) => {
      if (!Number.isInteger(this.data.start)) this.data.start = body.seq;
      this.later();
    });
    kernel.on('frame', (seq) => {
      if (seq) { this.data.cursor = Math.max(this.data.cursor || 0, seq); this.later(); }
    });
  }

  answered(msgId) { return this.data.answered.includes(msgId); }

  markAnswered(msgId) {
    this.data.answered = [...this.data.answered.filter((id) => id !== msgId), msgId].slice(-MAX_ANSWERED);
    this.save();
  }

  later() {
    if (this.timer === null) this.timer = setTimeout(() => this.save(), SAVE_EVERY_MS);
  }

  save() {
    if (this.timer !== null) { clearTimeout(this.timer); this.timer = null; }
    try { sessionStorage.setItem(this.key, JSON.stringify(this.data)); } catch (e) { /* storage full or off */ }
  }
}
