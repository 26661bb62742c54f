"""LLM workers: cascaded interest summaries (UIL, `service.py`) and DARE decoding (`dare/`)."""
