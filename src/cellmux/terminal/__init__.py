"""Terminal and editor clients: ``cellmux run``, ``console``, ``attach``, ``kernels``.

One module per command (L{run}, L{console}, L{watch}, L{table}); what they
share lives in L{server} (server URL, token and kernel names) and L{render}
(outputs as terminal text). Each command module has
``add_arguments(parser)`` and ``main(args) -> int`` for L{cellmux.cli}.
"""

__all__ = ()
