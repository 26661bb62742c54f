"""LLM workers: cascaded interest summaries (UIL) and DARE decoding. Not built yet (issues 4, 5)."""
