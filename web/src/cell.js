// A cell: a CodeMirror editor and its output area, run on one kernel.
// Shift+Enter runs the selection, or the whole cell; Tab completes from
// the kernel (or indents at the start of a line); Shift+Tab inspects.

import { autocompletion, startCompletion, completionStatus } from '@codemirror/autocomplete';
import { defaultKeymap, history, historyKeymap, indentLess, indentMore } from '@codemirror/commands';
import { python } from '@codemirror/lang-python';
import { bracketMatching, indentOnInput, syntaxHighlighting, defaultHighlightStyle } from '@codemirror/language';
import { EditorState, Compartment } from '@codemirror/state';
import { EditorView, keymap, lineNumbers, highlightActiveLine } from '@codemirror/view';
import { OutputArea } from './output.js';
import { appendAnsi } from './ansi.js';

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

// Jupyter counts cursor positions in code points, the editor in UTF-16 units.
function toCodePoints(text, offset) {
  return [...text.slice(0, offset)].length;
}

function fromCodePoints(text, points) {
  let offset = 0;
  for (const ch of text) {
    if (points-- <= 0) break;
    offset += ch.length;
  }
  return offset;
}

export class Cell {
  // kernel: a KernelClient, or a function returning a Promise of one.
  constructor({
    element, code = '', kernel, hideEditor = false, readOnly = false, onRun = null, runButton = false,
  }) {
    this.kernelSource = kernel;
    this.onRun = onRun;
    this.element = element;
    element.classList.add('cellmux-cell');
    this.prompt = el('div', 'cellmux-count', '[ ]');
    this.editorHost = el('div', 'cellmux-editor');
    this.inspector = el('pre', 'cellmux-inspect');
    this.inspector.hidden = true;
    const outputs = el('div', 'cellmux-outputs');
    this.output = new OutputArea(outputs);
    if (kernel && typeof kernel !== 'function') this.output.widgets = kernel.widgets;
    const top = el('div', 'cellmux-input');
    top.append(this.prompt, this.editorHost);
    if (runButton) {
      this.runButton = el('button', 'cellmux-run', 'Run');
      this.runButton.type = 'button';
      this.runButton.title = 'Run (Shift+Enter)';
      this.runButton.addEventListener('click', () => this.run());
      top.append(this.runButton);
    }
    element.append(top, this.inspector, outputs);
    if (hideEditor) top.hidden = true;
    this.readOnly = new Compartment();
    this.view = new EditorView({
      parent: this.editorHost,
      state: EditorState.create({
        doc: code,
        extensions: [
          lineNumbers(), history(), highlightActiveLine(), bracketMatching(), indentOnInput(),
          syntaxHighlighting(defaultHighlightStyle, { fallback: true }), python(),
          autocompletion({ override: [(ctx) => this._complete(ctx)], activateOnTyping: false }),
          keymap.of([
            { key: 'Shift-Enter', run: () => { this.run(this._selectedCode()); return true; } },
            { key: 'Tab', run: (view) => this._tab(view) },
            { key: 'Shift-Tab', run: (view) => { this._inspect(view); return true; } },
            ...historyKeymap, ...defaultKeymap,
          ]),
          this.readOnly.of([EditorState.readOnly.of(readOnly), EditorView.editable.of(!readOnly)]),
          EditorView.lineWrapping,
        ],
      }),
    });
    this.running = null;
  }

  setReadOnly(flag) {
    this.view.dispatch({
      effects: this.readOnly.reconfigure([EditorState.readOnly.of(flag), EditorView.editable.of(!flag)]),
    });
  }

  get code() { return this.view.state.doc.toString(); }

  set code(text) {
    this.view.dispatch({ changes: { from: 0, to: this.view.state.doc.length, insert: text } });
  }

  focus() { this.view.focus(); }

  _selectedCode() {
    const sel = this.view.state.selection.main;
    return sel.empty ? this.code : this.view.state.sliceDoc(sel.from, sel.to);
  }

  async _kernel() {
    return typeof this.kernelSource === 'function' ? this.kernelSource() : this.kernelSource;
  }

  _tab(view) {
    const { state } = view;
    const sel = state.selection.main;
    if (!sel.empty) return indentMore(view);
    const line = state.doc.lineAt(sel.head);
    const before = line.text.slice(0, sel.head - line.from);
    if (/^\s*$/.test(before)) return indentMore(view);
    if (completionStatus(state) === null) startCompletion(view);
    return true;
  }

  async _complete(ctx) {
    const kernel = await this._kernel();
    const code = ctx.state.doc.toString();
    const reply = await kernel.complete(code, toCodePoints(code, ctx.pos));
    // The server answers for a kernel whose GIL C code holds (protocol.md, 16).
    if (reply && reply.status === 'unresponsive') this._showInspector(ctx.view, reply.evalue);
    if (!reply || reply.status !== 'ok' || !reply.matches.length) return null;
    return {
      from: fromCodePoints(code, reply.cursor_start),
      to: fromCodePoints(code, reply.cursor_end),
      options: reply.matches.map((m) => ({ label: m })),
      filter: false,
    };
  }

  async _inspect(view) {
    const kernel = await this._kernel();
    const code = view.state.doc.toString();
    const reply = await kernel.inspect(code, toCodePoints(code, view.state.selection.main.head));
    if (reply && reply.status === 'unresponsive') { this._showInspector(view, reply.evalue); return; }
    this.inspector.replaceChildren();
    if (!reply || !reply.found) {
      this.inspector.textContent = 'no documentation found';
    } else {
      appendAnsi(this.inspector, reply.data['text/plain'] || '');
    }
    this._showInspector(view);
  }

  // Show the inspector pane (with TEXT, if given) until Escape.
  _showInspector(view, text) {
    if (text !== undefined) this.inspector.textContent = text;
    this.inspector.hidden = false;
    if (!view) return;
    const close = () => { this.inspector.hidden = true; view.dom.removeEventListener('keydown', onKey); };
    const onKey = (event) => { if (event.key === 'Escape') close(); };
    view.dom.addEventListener('keydown', onKey);
  }

  // Run code; a kernel that cannot be had (refused, over a limit, the
  // server away) is said in the output, never only in the devtools.
  async run(code = this.code) {
    if (this.onRun) this.onRun(this);
    let kernel;
    try {
      kernel = await this._kernel();
    } catch (e) {
      this.output.clear();
      this.output.failure(`cannot run: ${e.message || e}`);
      this.prompt.textContent = '[!]';
      return { status: 'error', ename: 'CellmuxError', evalue: String(e.message || e) };
    }
    this.output.widgets = kernel.widgets;
    this.output.clear();
    this.inspector.hidden = true;
    this.element.classList.add('cellmux-running');
    this.prompt.textContent = '[*]';
    const run = kernel.execute(code, {
      output: (msg) => this.output.message(msg),
      input: (prompt, password) => this.output.prompt(prompt, password),
    });
    this.running = run;
    const reply = await run;
    if (this.running === run) {
      this.element.classList.remove('cellmux-running');
      this.prompt.textContent = reply.execution_count ? `[${reply.execution_count}]` : '[ ]';
      if (reply.status === 'aborted') this.output.notice('not finished: the kernel stopped');
    }
    return reply;
  }
}
