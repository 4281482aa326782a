"""Routing: which delivery takes a message."""
