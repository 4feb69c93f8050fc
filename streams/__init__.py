"""streams part of edgeloop."""
