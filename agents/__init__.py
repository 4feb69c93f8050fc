"""agents part of edgeloop."""
