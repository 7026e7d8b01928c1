"""Helpers for tests and debugging: see which backend implementation actually ran."""

from ptfast._dispatch import record_dispatch

__all__ = ["record_dispatch"]
