"""Models: the item/summary text encoder (all-MiniLM-L6-v2). Fusion, adaptor and CTR models: issue 6."""
