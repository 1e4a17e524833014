"""ensc: compress a deep ensemble into a single network that costs what one member costs."""

__version__ = "0.1.0"
