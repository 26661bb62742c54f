"""LIBER-Stream: lifelong user interests from behaviour streams, incrementally, with LLMs."""

__version__ = "0.1.0"
