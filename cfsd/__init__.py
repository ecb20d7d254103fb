"""cfsd: a composefs repository daemon speaking varlink (and its storage library)."""

__version__ = "0.1.0"
