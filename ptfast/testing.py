"""Helpers for tests and debugging: see which backend implementation actually ran, and which kernel faults made
``auto`` fall back (``known_faults``; ``reset_faults`` forgets them)."""

from ptfast._dispatch import known_faults, record_dispatch, reset_faults

__all__ = ["known_faults", "record_dispatch", "reset_faults"]
