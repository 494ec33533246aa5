"""``cellmux host``: a nursery on a worker machine, linked to front servers
over TCP with ZeroMQ CURVE (docs/scaling.md, "Kernel hosts")."""
