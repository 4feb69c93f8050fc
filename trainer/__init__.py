"""trainer part of edgeloop."""
