"""Checks for ... (filled in per topic)."""

__all__: list = []
