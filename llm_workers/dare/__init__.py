"""DARE: retrieval-pool speculative decoding with relaxed verification (DESIGN.md section 2).

    suffix_index  token n-gram index of stored generations; heaviest-branch drafts (pure Python)
    pools         named pools (user clusters, item groups, global), bounded, in RocksDB
    routing       k-means user clusters and item groups -> pool names of a request
    decoder       the transformers decoding loop: draft, verify (strict | relaxed), crop the cache;
                  one request or a batch stepped together, optional logits processors
    backend       DARE inside the LLM worker's transformers backend (LIBER_LLM_DARE=1)
    metrics       Prometheus counters `liber_dare_*`, per pool
    bench         `liber bench dare`; uil_prompts builds its cascaded prompts
    bench_backend the worker's backend plain vs DARE (`python -m benchmarks.bench_dare_backend`)
    bench_span    one verification pass's cost per draft length and dtype

Importing this package imports nothing heavy; torch is needed only by `decoder` (and
`backend`, `engine`, which use it) and `routing.kmeans`.
"""
