"""cellmux: serve stock ipykernel kernels to many remote clients at once."""

__version__ = "0.1.0"

__all__ = ["__version__"]
