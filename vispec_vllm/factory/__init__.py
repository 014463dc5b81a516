"""Offline model factories (tooling: the plugin never imports this package): Hugging Face
target-building helpers and the tiny test models."""
