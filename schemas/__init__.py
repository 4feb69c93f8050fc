"""schemas part of edgeloop."""
