// The console page served at "/": cells on one kernel, its state, and the
// toolbar (interrupt, restart, share links, upload, permalink).

import { Cell } from './cell.js';
import { Channel, Socket } from './frames.js';
import { KernelClient } from './kernel.js';
import { SessionMemory } from './reload.js';

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}

async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    init.body = typeof body === 'string' || body instanceof Blob ? body : JSON.stringify(body);
    if (!(body instanceof Blob)) init.headers['content-type'] = 'application/json';
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { message: text }; }
  if (!response.ok) {
    throw Object.assign(new Error((data && data.message) || response.statusText), { status: response.status });
  }
  return data;
}

function replaceParams(params) {
  const query = params.toString();
  history.replaceState(null, '', location.pathname + (query ? '?' + query : ''));
}

function loginForm(root, message) {
  const input = el('input', { type: 'password', id: 'login-token', placeholder: 'token', autocomplete: 'off' });
  const form = el('form', { class: 'cellmux-login' },
    el('p', {}, message), input, el('button', { type: 'submit' }, 'Log in'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const r = await fetch('/login', { method: 'POST', headers: { authorization: 'token ' + input.value } });
    if (r.ok) location.reload(); else form.querySelector('p').textContent = 'That token is not valid.';
  });
  root.replaceChildren(form);
}

export async function startConsole(root = document.getElementById('cellmux-console')) {
  const params = new URLSearchParams(location.search);
  const token = params.get('token');
  if (token) {
    // Trade the token for the login cookie, then take it out of the address bar.
    await fetch('/login', { method: 'POST', headers: { authorization: 'token ' + token } });
    params.delete('token');
    replaceParams(params);
  }
  let kernelId = params.get('kernel');
  // A public visitor's capability for their kernel: in this tab only.
  let capability = kernelId ? sessionStorage.getItem(`cellmux-capability:${kernelId}`) : null;
  if (!kernelId) {
    try {
      // ?spec=NAME: a kernel of that kernel spec (the picker sends it).
      const spec = params.get('spec');
      kernelId = (await api('POST', '/api/kernels', spec ? { name: spec } : {})).id;
      params.delete('spec');
    } catch (e) {
      if (e.status !== 403) {
        root.textContent = `Cannot start a kernel: ${e.message}`;
        return null;
      }
      // No login: on a server in public mode, a kernel of the visitor's own.
      try {
        const visitor = await api('POST', '/embed/kernels');
        kernelId = visitor.id;
        capability = visitor.token;
        sessionStorage.setItem(`cellmux-capability:${kernelId}`, capability);
      } catch (e2) {
        if (e2.status === 403) { loginForm(root, 'This server needs a token.'); return null; }
        root.textContent = `Cannot start a kernel: ${e2.message}`;
        return null;
      }
    }
    params.set('kernel', kernelId);
    replaceParams(params);
  }
  const ui = new ConsoleUI(root, kernelId, params.get('transport') || 'auto', capability);
  await ui.start(params.get('permalink'), params.get('run') === '1');
  window.cellmuxConsole = ui;
  return ui;
}

class ConsoleUI {
  constructor(root, kernelId, transport, capability = null) {
    this.root = root;
    this.kernelId = kernelId;
    this.capability = capability;
    // A reload resumes this tab's session: same stdin routing, every cell replayed.
    this.memory = new SessionMemory(kernelId);
    this.resumed = this.memory.session !== null;
    this.kernel = new KernelClient({
      kernelId, transport, token: capability,
      session: this.memory.session, cursor: this.memory.resumeCursor,
    });
    this.memory.track(this.kernel);
    this.kernel.on('answered', (id) => this.memory.markAnswered(id));
    this.cells = [];
    this.foreign = new Map(); // parent msg_id -> cell showing a run this page did not start
    this.state = el('span', { id: 'kernel-state', class: 'state-starting' }, 'starting');
    this.transportLabel = el('span', { id: 'transport', class: 'cellmux-muted' });
    this.buttons = {
      interrupt: el('button', { id: 'interrupt', title: 'Interrupt (send SIGINT)' }, 'Interrupt'),
      restart: el('button', { id: 'restart', title: 'Restart the kernel' }, 'Restart'),
      shareCollaborator: el('button', { id: 'share-collaborator' }, 'Share: collaborate'),
      shareObserver: el('button', { id: 'share-observer' }, 'Share: read-only'),
      upload: el('button', { id: 'upload' }, 'Upload'),
      permalink: el('button', { id: 'permalink' }, 'Permalink'),
    };
    this.fileInput = el('input', { type: 'file', id: 'upload-input', multiple: '', hidden: '' });
    // The kernel spec picker: choosing one opens a new kernel of it here.
    this.specPicker = el('select', { id: 'kernel-spec', title: 'Kernel spec: pick one for a new kernel', hidden: '' });
    this.linkBox = el('div', { id: 'links', class: 'cellmux-links' });
    this.notices = el('div', { id: 'notices', class: 'cellmux-notices' });
    this.fileList = el('ul', { id: 'files', class: 'cellmux-files' });
    this.cellBox = el('main', { id: 'cells' });
    const bar = el('header', { class: 'cellmux-bar' },
      el('strong', {}, 'cellmux'), el('span', { class: 'cellmux-kernel-label' }, 'kernel '),
      this.specPicker, this.state, this.transportLabel, ...Object.values(this.buttons), this.fileInput);
    const side = el('aside', { class: 'cellmux-side' }, el('h2', {}, 'Files'), this.fileList);
    // The bar, share links and notices stay on top together, and whatever
    // scrolls into view stops below them, never under them.
    const top = el('div', { class: 'cellmux-top' }, bar, this.linkBox, this.notices);
    new ResizeObserver(() => {
      document.documentElement.style.scrollPaddingTop = `${top.offsetHeight + 8}px`;
    }).observe(top);
    root.replaceChildren(top, el('div', { class: 'cellmux-body' }, this.cellBox, side));
  }

  // permalink: an id (or z/<blob>) whose code fills the first cell; run:
  // run it at once (so does a permalink whose options say autorun).
  async start(permalink, run = false) {
    const k = this.kernel;
    k.on('status', (state, cause) => this._showState(state, cause));
    k.on('notice', (text) => this._notice(text));
    k.on('foreign', (msg) => this._foreign(msg));
    k.on('files', (content) => this._files([...(content.new || []), ...(content.changed || [])]));
    try {
      await k.connect();
    } catch (e) {
      this._notice(`cannot attach to the kernel: ${e.message}`);
      return;
    }
    this.transportLabel.textContent = `via ${k.transport.kind}`;
    this.root.dataset.transport = k.transport.kind;
    this.root.dataset.role = k.role;
    const observer = k.role === 'observer';
    if (observer) {
      this._notice('read-only: you see this kernel\'s output but cannot run code');
      for (const b of Object.values(this.buttons)) b.disabled = true;
    } else {
      this._wireButtons();
      if (k.role !== 'owner') {
        this.buttons.restart.disabled = true;
        this.buttons.shareCollaborator.disabled = true;
        this.buttons.shareObserver.disabled = true;
      }
      if (this.capability) {
        // A public visitor: their kernel's cells, nothing of the server's.
        this.buttons.upload.disabled = true;
        this.buttons.permalink.disabled = true;
      }
    }
    this._showState(k.state, k.cause);
    if (k.role === 'owner' && !this.capability) this._fillSpecPicker().catch(() => {});
    if (!this.capability) {
      api('GET', `/files/${this.kernelId}/`).then((r) => this._files(r.files || []), () => {});
    }
    if (!observer) {
      let code = '';
      let autorun = run;
      if (permalink && !this.resumed) {
        try {
          const stored = await api('GET', `/permalink/${permalink}`);
          code = stored.code;
          autorun = autorun || !!(stored.options && stored.options.autorun);
        } catch (e) {
          this._notice(`permalink not found: ${e.message}`);
        }
      }
      const cell = this.addCell(code);
      cell.focus();
      if (autorun && code.trim()) cell.run();
    }
    this.root.dataset.ready = 'true';
  }

  addCell(code = '', { readOnly = false } = {}) {
    const element = el('section', { class: 'cellmux-console-cell' });
    this.cellBox.appendChild(element);
    const cell = new Cell({
      element, code, kernel: this.kernel, readOnly,
      onRun: (c) => {
        // Running the last cell opens a fresh one below, like a console.
        if (c === this.cells[this.cells.length - 1] && !readOnly) this.addCell().focus();
      },
    });
    this.cells.push(cell);
    return cell;
  }

  // A run this page did not start: another client's (a grey read-only
  // cell), or this session's from before a reload (an ordinary cell, with
  // its output and, if it still waits, its input() prompt).
  _foreign(msg) {
    const parent = msg.parent || {};
    const parentId = parent.msg_id;
    if (!parentId || parent.msg_type !== 'execute_request') return;
    const type = msg.header.msg_type;
    let cell = this.foreign.get(parentId);
    if (!cell) {
      cell = this._runCell(parent.session === this.kernel.session);
      this.foreign.set(parentId, cell);
      if (type !== 'execute_input') cell.output.notice('(this run started before the page\'s history)');
    }
    switch (type) {
      case 'execute_input':
        if (!cell.code) cell.code = msg.content.code;
        cell.prompt.textContent = `[${msg.content.execution_count}]`;
        break;
      case 'execute_reply':
        cell.element.classList.remove('cellmux-running');
        if (msg.content.execution_count) cell.prompt.textContent = `[${msg.content.execution_count}]`;
        cell.output.cancelPrompt();
        break;
      case 'input_request':
        this._restorePrompt(cell, msg);
        break;
      default:
        cell.output.message(msg);
    }
  }

  _runCell(own) {
    const cls = own ? 'cellmux-console-cell cellmux-restored' : 'cellmux-console-cell cellmux-foreign';
    const element = el('section', { class: cls });
    // Above the console's input cell (the fresh one at the bottom), if it has one yet.
    const last = this.cells[this.cells.length - 1];
    const input = last && !last.restored && last.element === this.cellBox.lastElementChild ? last : null;
    if (input) this.cellBox.insertBefore(element, input.element);
    else this.cellBox.appendChild(element);
    const cell = new Cell({ element, code: '', kernel: this.kernel, readOnly: !own });
    cell.restored = true;
    element.classList.add('cellmux-running');
    cell.prompt.textContent = '[*]';
    if (own) this.cells.splice(input ? this.cells.length - 1 : this.cells.length, 0, cell);
    return cell;
  }

  // An input() of this session that the page before the reload did not
  // answer: ask again (once, even if the server both replays and resends it).
  _restorePrompt(cell, msg) {
    const id = msg.header.msg_id;
    if (this.memory.answered(id) || cell.promptId === id) return;
    cell.promptId = id;
    cell.output.prompt(msg.content.prompt, !!msg.content.password).then((value) => {
      if (value === null) return; // superseded, or the run ended
      this.memory.markAnswered(id);
      this.kernel.send(Channel.STDIN, Socket.STDIN, 'input_reply', { value, status: 'ok' }, null, msg.header);
    });
  }

  async _fillSpecPicker() {
    const [specs, model] = await Promise.all([
      api('GET', '/api/kernelspecs'), api('GET', `/api/kernels/${this.kernelId}`)]);
    for (const [name, spec] of Object.entries(specs.kernelspecs)) {
      this.specPicker.appendChild(el('option', { value: name }, spec.spec.display_name || name));
    }
    this.specPicker.value = model.name;
    this.root.dataset.spec = model.name;
    this.specPicker.hidden = false;
    this.specPicker.addEventListener('change', () => {
      location.assign(`${location.pathname}?spec=${encodeURIComponent(this.specPicker.value)}`);
    });
  }

  _showState(state, cause) {
    this.state.className = `state-${state}`;
    this.state.textContent = cause ? `${state} (${cause})` : state;
    this.state.title = cause || state;
  }

  _notice(text) {
    const item = el('div', { class: 'cellmux-notice' }, text);
    this.notices.appendChild(item);
    while (this.notices.children.length > 5) this.notices.firstChild.remove();
  }

  _wireButtons() {
    const b = this.buttons;
    b.interrupt.addEventListener('click', () => this.kernel.interrupt().catch((e) => this._notice(e.message)));
    b.restart.addEventListener('click', async () => {
      b.restart.disabled = true;
      try { await this.kernel.restart(); this._notice('kernel restarted'); } catch (e) { this._notice(e.message); }
      b.restart.disabled = false;
    });
    b.shareCollaborator.addEventListener('click', () => this._share('collaborator'));
    b.shareObserver.addEventListener('click', () => this._share('observer'));
    b.upload.addEventListener('click', () => this.fileInput.click());
    this.fileInput.addEventListener('change', () => this._upload([...this.fileInput.files]));
    document.addEventListener('dragover', (event) => { event.preventDefault(); document.body.classList.add('cellmux-dragging'); });
    document.addEventListener('dragleave', () => document.body.classList.remove('cellmux-dragging'));
    document.addEventListener('drop', (event) => {
      event.preventDefault();
      document.body.classList.remove('cellmux-dragging');
      this._upload([...event.dataTransfer.files]);
    });
    b.permalink.addEventListener('click', () => this._permalink());
  }

  _showLink(id, label, url) {
    let row = this.linkBox.querySelector(`[data-link="${id}"]`);
    if (!row) {
      row = el('div', { 'data-link': id });
      this.linkBox.appendChild(row);
    }
    const field = el('input', { type: 'text', readonly: '', class: 'cellmux-link', id: `${id}-link` });
    field.value = url;
    const copy = el('button', {}, 'Copy');
    copy.addEventListener('click', () => { field.select(); navigator.clipboard?.writeText(url); });
    row.replaceChildren(el('span', {}, label + ': '), field, copy);
    field.focus({ preventScroll: true });
    field.select();
  }

  async _share(role) {
    try {
      const share = await api('POST', `/api/kernels/${this.kernelId}/shares`, { role });
      const next = `/?kernel=${this.kernelId}`;
      // kernel= lets a proxy send the login to the kernel's front (scaling.md).
      const url = `${location.origin}/login?kernel=${this.kernelId}&token=${encodeURIComponent(share.token)}&next=${encodeURIComponent(next)}`;
      this._showLink(`share-${role}`, role === 'observer' ? 'Read-only link' : 'Collaborator link', url);
    } catch (e) {
      this._notice(`cannot share: ${e.message}`);
    }
  }

  async _upload(files) {
    for (const file of files) {
      const name = file.name.split('/').map(encodeURIComponent).join('/');
      try {
        await api('PUT', `/files/${this.kernelId}/${name}`, file);
        this._notice(`uploaded ${file.name}`);
        this._files([{ name: file.name, size: file.size, url: `/files/${this.kernelId}/${name}` }]);
      } catch (e) {
        this._notice(`upload of ${file.name} failed: ${e.message}`);
      }
    }
  }

  _files(entries) {
    for (const f of entries) {
      const url = f.url || `/files/${this.kernelId}/${f.name.split('/').map(encodeURIComponent).join('/')}`;
      let item = [...this.fileList.children].find((li) => li.dataset.name === f.name);
      if (!item) {
        item = el('li');
        item.dataset.name = f.name;
        this.fileList.appendChild(item);
      }
      const link = el('a', { href: url, download: f.name.split('/').pop(), class: 'cellmux-download' }, f.name);
      item.replaceChildren(link, el('span', { class: 'cellmux-muted' }, ` ${f.size} B`));
    }
  }

  async _permalink() {
    const cell = this.cells.filter((c) => c.code.trim()).pop();
    const code = cell ? cell.code : '';
    let id;
    try {
      id = (await api('POST', '/permalink', { code, language: 'python' })).id;
    } catch (e) {
      try {
        id = 'z/' + (await api('POST', '/permalink/inline', { code, language: 'python' })).inline;
      } catch (e2) {
        this._notice(`cannot make a permalink: ${e2.message}`);
        return;
      }
    }
    const url = `${location.origin}/?permalink=${id}`;
    this._showLink('permalink', 'Permalink', url);
    this._showLink('permalink-run', 'Runs when opened', `${url}&run=1`);
  }
}
