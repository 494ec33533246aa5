"""Jupyter's kernel gateway API on cellmux kernels (see docs/jupyter.md).

L{codec} translates Jupyter's websocket formats (sans-IO: importing it pulls
in no Twisted, so this package imports nothing eagerly), L{channels} is the
websocket endpoint, L{kernelspecs} the specs and their files.
"""
