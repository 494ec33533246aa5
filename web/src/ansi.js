// ANSI SGR escapes (colours, bold, italic, underline) to DOM nodes. Text
// always goes in as textContent: nothing here parses markup.

const BASIC = ['black', 'red', 'green', 'yellow', 'blue', 'magenta', 'cyan', 'white'];

function color256(n) {
  if (n < 16) return null; // mapped to classes by the caller
  if (n >= 232) { const v = 8 + (n - 232) * 10; return `rgb(${v},${v},${v})`; }
  const i = n - 16;
  const level = (x) => (x === 0 ? 0 : 55 + x * 40);
  return `rgb(${level(Math.floor(i / 36))},${level(Math.floor(i / 6) % 6)},${level(i % 6)})`;
}

function basicClass(n) {
  return n < 8 ? `ansi-${BASIC[n]}` : `ansi-bright-${BASIC[n - 8]}`;
}

// Apply one SGR parameter list to the style state.
function apply(state, params) {
  for (let i = 0; i < params.length; i++) {
    const p = params[i];
    if (p === 0) Object.assign(state, { fg: null, bg: null, bold: false, italic: false, underline: false });
    else if (p === 1) state.bold = true;
    else if (p === 3) state.italic = true;
    else if (p === 4) state.underline = true;
    else if (p === 22) state.bold = false;
    else if (p === 23) state.italic = false;
    else if (p === 24) state.underline = false;
    else if (p >= 30 && p <= 37) state.fg = { cls: basicClass(p - 30) };
    else if (p >= 90 && p <= 97) state.fg = { cls: basicClass(p - 90 + 8) };
    else if (p >= 40 && p <= 47) state.bg = { cls: basicClass(p - 40) };
    else if (p >= 100 && p <= 107) state.bg = { cls: basicClass(p - 100 + 8) };
    else if (p === 39) state.fg = null;
    else if (p === 49) state.bg = null;
    else if ((p === 38 || p === 48) && params[i + 1] === 5) {
      const n = params[i + 2] ?? 0;
      const c = n < 16 ? { cls: basicClass(n) } : { css: color256(n) };
      if (p === 38) state.fg = c; else state.bg = c;
      i += 2;
    } else if ((p === 38 || p === 48) && params[i + 1] === 2) {
      const c = { css: `rgb(${params[i + 2] ?? 0},${params[i + 3] ?? 0},${params[i + 4] ?? 0})` };
      if (p === 38) state.fg = c; else state.bg = c;
      i += 4;
    }
  }
}

function span(text, state) {
  if (!state.fg && !state.bg && !state.bold && !state.italic && !state.underline) {
    return document.createTextNode(text);
  }
  const el = document.createElement('span');
  el.textContent = text;
  if (state.fg) { if (state.fg.cls) el.classList.add(state.fg.cls); else el.style.color = state.fg.css; }
  if (state.bg) {
    if (state.bg.cls) el.classList.add(state.bg.cls + '-bg'); else el.style.backgroundColor = state.bg.css;
  }
  if (state.bold) el.classList.add('ansi-bold');
  if (state.italic) el.classList.add('ansi-italic');
  if (state.underline) el.classList.add('ansi-underline');
  return el;
}

// Append `text` with its escapes rendered to `parent`.
export function appendAnsi(parent, text, state = {}) {
  // CSI sequences: ESC [ params final-byte. Only SGR ("m") has an effect.
  const re = /\x1b\[([0-9;]*)([A-Za-z])/g;
  let last = 0;
  let match;
  while ((match = re.exec(text)) !== null) {
    if (match.index > last) parent.appendChild(span(text.slice(last, match.index), state));
    if (match[2] === 'm') {
      const params = match[1] === '' ? [0] : match[1].split(';').map((x) => Number(x) || 0);
      apply(state, params);
    }
    last = re.lastIndex;
  }
  if (last < text.length) parent.appendChild(span(text.slice(last), state));
  return state;
}

export function stripAnsi(text) {
  return text.replace(/\x1b\[[0-9;]*[A-Za-z]/g, '');
}
