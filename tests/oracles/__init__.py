"""Independent float64 reference implementations, one file per op, used by tests only.

They are written naively from the mathematical definition (no code shared with any ptfast backend), so a
backend is never checked against itself.
"""
