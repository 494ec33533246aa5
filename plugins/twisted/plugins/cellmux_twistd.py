"""The ``twistd cellmux`` plugin: ``twistd -n cellmux --port 8800``."""

from twisted.application.service import ServiceMaker

cellmux = ServiceMaker(
    "cellmux",
    "cellmux.tap",
    "Serve ipykernel kernels to websocket clients over multiplexed links.",
    "cellmux",
)
