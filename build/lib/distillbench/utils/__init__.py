"""Small shared utilities: atomic I/O, run folders, config helpers."""
