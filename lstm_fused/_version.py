"""The package version, in one place: lstm_fused.__version__ reads it, and setup.py is to read it
too (see the README's Development section)."""
__version__ = "0.1.0"
