"""edgeloop: closes the loop between edge inference devices and a GPU training cluster."""

__version__ = "0.1.0"
