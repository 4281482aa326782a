"""Secrets: references in the config, backends that resolve them, and a refreshing store."""
