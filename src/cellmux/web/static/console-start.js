window.cellmux.startConsole();
