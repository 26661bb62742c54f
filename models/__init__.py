"""Text encoder, fusion, hybrid-expert adaptor and CTR models. Not built yet (issue 6)."""
