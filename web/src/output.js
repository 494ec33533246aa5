// An output area: streams, rich display data, errors. Kernel HTML,
// JavaScript and Markdown go into sandboxed iframes (scripts may run there,
// in an opaque origin, never in the page's); images go into <img> from
// data: URLs; text goes in as textContent.

import katex from 'katex';
import { marked } from 'marked';
import { appendAnsi } from './ansi.js';
import { WIDGET_VIEW_MIME } from './widgets/bridge.js';

const RICH_ORDER = [
  'application/javascript', 'text/html', 'image/svg+xml', 'image/png', 'image/jpeg',
  'text/markdown', 'text/latex', 'text/plain',
];

// The frame tells its parent how tall it is; nothing else crosses over.
const RESIZER = `<script>(function(){function s(){parent.postMessage({cellmuxFrameHeight:
document.documentElement.scrollHeight},'*')}addEventListener('load',s);
new ResizeObserver(s).observe(document.documentElement);s()})()</script>`;

const FRAME_STYLE = `<style>body{margin:0;font:14px system-ui,sans-serif}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>`;

window.addEventListener('message', (event) => {
  const frame = [...document.querySelectorAll('iframe.cellmux-frame')]
    .find((f) => f.contentWindow === event.source);
  const h = event.data && event.data.cellmuxFrameHeight;
  if (frame && typeof h === 'number' && h >= 0) frame.style.height = Math.min(h + 4, 5000) + 'px';
});

export function sandboxedFrame(html) {
  const frame = document.createElement('iframe');
  // allow-scripts WITHOUT allow-same-origin: an opaque origin, no cookies,
  // no access to the page.
  frame.setAttribute('sandbox', 'allow-scripts');
  frame.className = 'cellmux-frame';
  frame.srcdoc = `<!doctype html><meta charset="utf-8">${FRAME_STYLE}${html}${RESIZER}`;
  return frame;
}

function latex(text) {
  const el = document.createElement('div');
  el.className = 'cellmux-latex';
  let source = text.trim();
  let display = true;
  if (source.startsWith('$$') && source.endsWith('$$')) source = source.slice(2, -2);
  else if (source.startsWith('$') && source.endsWith('$')) { source = source.slice(1, -1); display = false; }
  else if (source.startsWith('\\[') && source.endsWith('\\]')) source = source.slice(2, -2);
  try {
    katex.render(source, el, { displayMode: display, throwOnError: false, trust: false });
  } catch (e) {
    el.textContent = text;
  }
  return el;
}

// widgets: the kernel's WidgetBridge, which shows widget views (in their own
// sandboxed frames); without one, a widget shows as its text/plain.
export function renderMime(data, widgets = null, area = null) {
  const view = data[WIDGET_VIEW_MIME];
  if (widgets && view && typeof view.model_id === 'string') {
    const frame = widgets.view(view.model_id, area);
    frame.dataset.mime = WIDGET_VIEW_MIME;
    return frame;
  }
  const mime = RICH_ORDER.find((m) => m in data);
  if (mime === undefined) {
    const el = document.createElement('pre');
    el.textContent = `[no renderer for ${Object.keys(data).join(', ')}]`;
    return el;
  }
  const value = Array.isArray(data[mime]) ? data[mime].join('') : data[mime];
  let el;
  switch (mime) {
    case 'application/javascript':
      el = sandboxedFrame(`<div id="output"></div><script>${value.replace(/<\/script/gi, '<\\/script')}</script>`);
      break;
    case 'text/html':
      el = sandboxedFrame(value);
      break;
    case 'text/markdown':
      el = sandboxedFrame(marked.parse(value));
      break;
    case 'image/svg+xml':
      el = document.createElement('img');
      el.src = 'data:image/svg+xml;charset=utf-8,' + encodeURIComponent(value);
      break;
    case 'image/png':
    case 'image/jpeg':
      el = document.createElement('img');
      el.src = `data:${mime};base64,${value.replace(/\s/g, '')}`;
      break;
    case 'text/latex':
      el = latex(value);
      break;
    default:
      el = document.createElement('pre');
      appendAnsi(el, value);
  }
  el.dataset.mime = mime;
  return el;
}

export class OutputArea {
  constructor(element) {
    this.element = element;
    this.lastStream = null;
    this.clearPending = false;
    this.displays = new Map(); // display_id -> [wrapper]
    this.widgets = null; // the kernel's WidgetBridge, once known
    this.activePrompt = null;
  }

  clear() {
    this.element.replaceChildren();
    this.lastStream = null;
    this.displays.clear();
    this.activePrompt = null;
  }

  _add(el) {
    if (this.clearPending) { this.clear(); this.clearPending = false; }
    this.element.appendChild(el);
    if (!el.classList.contains('cellmux-stream')) this.lastStream = null;
    return el;
  }

  stream(name, text) {
    if (this.clearPending) { this.clear(); this.clearPending = false; }
    if (!this.lastStream || this.lastStream.dataset.name !== name) {
      const pre = document.createElement('pre');
      pre.className = `cellmux-stream cellmux-${name}`;
      pre.dataset.name = name;
      this.element.appendChild(pre);
      this.lastStream = pre;
      pre.ansiState = {};
    }
    appendAnsi(this.lastStream, text, this.lastStream.ansiState);
  }

  display(content, kind) {
    const wrapper = document.createElement('div');
    wrapper.className = `cellmux-display cellmux-${kind}`;
    if (kind === 'execute_result' && content.execution_count) {
      wrapper.dataset.count = content.execution_count;
    }
    wrapper.appendChild(renderMime(content.data || {}, this.widgets, this));
    const id = content.transient && content.transient.display_id;
    if (id) {
      if (!this.displays.has(id)) this.displays.set(id, []);
      this.displays.get(id).push(wrapper);
    }
    this._add(wrapper);
  }

  updateDisplay(content) {
    const id = content.transient && content.transient.display_id;
    for (const wrapper of this.displays.get(id) || []) {
      wrapper.replaceChildren(renderMime(content.data || {}, this.widgets, this));
    }
  }

  error(content) {
    const pre = document.createElement('pre');
    pre.className = 'cellmux-error';
    const lines = content.traceback && content.traceback.length
      ? content.traceback : [`${content.ename}: ${content.evalue}`];
    appendAnsi(pre, lines.join('\n'));
    this._add(pre);
  }

  notice(text) {
    const el = document.createElement('div');
    el.className = 'cellmux-notice';
    el.textContent = text;
    this._add(el);
  }

  // Something went wrong outside the kernel (no kernel, refused): plain text.
  failure(text) {
    const el = document.createElement('div');
    el.className = 'cellmux-failure';
    el.setAttribute('role', 'alert');
    el.textContent = text;
    this._add(el);
  }

  // One Jupyter message from the kernel.
  message(msg) {
    const c = msg.content;
    switch (msg.header.msg_type) {
      case 'stream': this.stream(c.name, c.text); break;
      case 'display_data': this.display(c, 'display'); break;
      case 'execute_result': this.display(c, 'execute_result'); break;
      case 'update_display_data': this.updateDisplay(c); break;
      case 'error': this.error(c); break;
      case 'clear_output':
        if (c.wait) this.clearPending = true; else this.clear();
        break;
      default: break;
    }
  }

  // Withdraw a prompt nobody answered (its run ended, or a newer one came).
  cancelPrompt() {
    const active = this.activePrompt;
    if (!active) return;
    this.activePrompt = null;
    const gone = document.createElement('span');
    gone.className = 'cellmux-stdin-answer cellmux-muted';
    gone.textContent = '(not answered)';
    active.input.replaceWith(gone);
    active.resolve(null);
  }

  // An inline prompt for input() / getpass / pdb; resolves with the answer
  // (null if it was withdrawn).
  prompt(text, password) {
    this.cancelPrompt();
    return new Promise((resolve) => {
      if (this.clearPending) { this.clear(); this.clearPending = false; }
      const row = document.createElement('div');
      row.className = 'cellmux-stdin';
      const label = document.createElement('span');
      label.className = 'cellmux-stdin-prompt';
      label.textContent = text;
      const input = document.createElement('input');
      input.type = password ? 'password' : 'text';
      input.className = 'cellmux-stdin-input';
      input.autocomplete = 'off';
      input.spellcheck = false;
      input.addEventListener('keydown', (event) => {
        if (event.key !== 'Enter') return;
        event.preventDefault();
        const value = input.value;
        const answered = document.createElement('span');
        answered.className = 'cellmux-stdin-answer';
        answered.textContent = password ? '••••' : value;
        input.replaceWith(answered);
        this.activePrompt = null;
        resolve(value);
      });
      row.append(label, input);
      this.activePrompt = { input, resolve };
      this.element.appendChild(row);
      this.lastStream = null;
      input.focus();
    });
  }
}
