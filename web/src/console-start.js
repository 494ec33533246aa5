// Started by console.html (no inline script: the page's CSP need not allow it).
window.cellmux.startConsole();
