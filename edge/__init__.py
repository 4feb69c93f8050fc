"""edge part of edgeloop."""
