// The bundle's public face: window.cellmux = {makeCell, startConsole, KernelClient}.

import { Cell } from './cell.js';
import { startConsole } from './console.js';
import { KernelClient } from './kernel.js';

// Where this script came from: the default server of embedded cells.
const scriptOrigin = (() => {
  const src = document.currentScript && document.currentScript.src;
  try { return src ? new URL(src).origin : location.origin; } catch (e) { return location.origin; }
})();

const linked = new Map(); // server + linkKey -> Promise<KernelClient>
const styled = new Set();

function addStyle(server) {
  if (styled.has(server) || server === location.origin) return;
  styled.add(server);
  const link = document.createElement('link');
  link.rel = 'stylesheet';
  link.href = `${server}/static/cellmux.css`;
  document.head.appendChild(link);
}

// The server's own words for a refused request ({message} in its JSON).
async function refusal(response) {
  let message = '';
  try { message = (await response.json()).message || ''; } catch (e) { /* not JSON */ }
  return `${message || response.statusText || 'refused'} (HTTP ${response.status})`;
}

// A kernel for embedded cells. With a token, that token's; without one, on
// a server in public mode, a kernel of this visitor's own, reached with the
// capability the server mints for it (never the server's token).
async function newKernel(server, token, transport, linkKey) {
  // A public visitor's linked cells keep their kernel across reloads of
  // the page (in this tab), while it lives: each reload would otherwise
  // take one more of the address's places.
  const kept = !token && linkKey ? `cellmux-visitor:${server}\n${linkKey}` : null;
  const stored = kept && JSON.parse(sessionStorage.getItem(kept) || 'null');
  if (stored) {
    const again = new KernelClient({ server, kernelId: stored.id, token: stored.token, transport });
    try {
      await again.connect();
      return again;
    } catch (e) {
      sessionStorage.removeItem(kept); // it ended: start another
    }
  }
  const headers = token ? { authorization: 'token ' + token } : {};
  let response;
  try {
    response = await fetch(`${server}/embed/kernels`, {
      method: 'POST', headers, credentials: token ? 'omit' : 'include',
    });
  } catch (e) {
    // A refusal without CORS headers (an origin the server does not admit)
    // reaches the page only as this failure.
    throw new Error(`the server ${server} cannot be reached, or does not admit this page's origin (allow_origins)`);
  }
  if (!response.ok) throw new Error(`no kernel: ${await refusal(response)}`);
  const model = await response.json();
  const kernel = new KernelClient({
    server, kernelId: model.id, token: model.token || token, transport,
  });
  await kernel.connect();
  if (kept && model.token) sessionStorage.setItem(kept, JSON.stringify({ id: model.id, token: model.token }));
  return kernel;
}

function kernelFor(server, { linkKey, token, transport }) {
  const key = linkKey ? `${server}\n${linkKey}` : null;
  if (key && linked.has(key)) return linked.get(key);
  const kernel = newKernel(server, token, transport, linkKey);
  if (key) {
    linked.set(key, kernel);
    // A failure is not kept: the next run asks again (a limit may have passed).
    kernel.catch(() => { if (linked.get(key) === kernel) linked.delete(key); });
  }
  return kernel;
}

// Turn an element into a live cell. Options: element (node or selector),
// code (default: the element's text), autorun, hideEditor, runButton
// (default: true), server (default: where this script came from), linkKey
// (cells with the same key share a kernel), token, transport ('auto' |
// 'websocket' | 'longpoll').
export function makeCell(options = {}) {
  const element = typeof options.element === 'string'
    ? document.querySelector(options.element) : options.element;
  if (!element) throw new Error('makeCell needs an element');
  const server = (options.server || scriptOrigin).replace(/\/$/, '');
  addStyle(server);
  const code = options.code ?? element.textContent.trim();
  element.textContent = '';
  let kernel = null;
  const cell = new Cell({
    element, code, hideEditor: !!options.hideEditor, runButton: options.runButton !== false,
    kernel: () => {
      if (!kernel) {
        kernel = kernelFor(server, options);
        kernel.catch(() => { kernel = null; });
      }
      return kernel;
    },
  });
  if (options.autorun) cell.run();
  return cell;
}

export { Cell, KernelClient, startConsole };
