"""DARE for a transformers backend in one object: pools on disk, routing, decoding, feeding.

    engine = DareEngine.open(settings, model)          # pools from RocksDB, router from its meta
    engine.fit_router(user_vectors)                     # once (or when users drift), persisted
    gen = engine.generate(prompt_ids, user_vector, item_groups, max_new_tokens=128)

`generate` decodes with the configured verification, then feeds the generation into the pools
it read (its user's cluster, its partition's top item groups), so later requests of the same
group draft from it. A restarted worker reopens the same RocksDB directory and starts warm.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from llm_workers.dare.decoder import DareDecoder, DraftedGeneration
from llm_workers.dare.metrics import DareStats
from llm_workers.dare.pools import PoolConfig, PoolStore
from llm_workers.dare.routing import PoolRouter, kmeans

MODES = ("off", "strict", "relaxed")
ROUTER_META = "router"


def check_settings(settings) -> None:
    """The DARE settings' own validation (Settings.validate does not know them)."""
    from core.settings import SettingsError
    if settings.dare_mode not in MODES:
        raise SettingsError(f"LIBER_DARE_MODE={settings.dare_mode!r}: must be off, strict or relaxed")
    for name in ("dare_top_k", "dare_clusters", "dare_max_ngram", "dare_pool_max_tokens"):
        if getattr(settings, name) < 1:
            raise SettingsError(f"LIBER_{name.upper()}={getattr(settings, name)!r}: must be >= 1")
    for name in ("dare_draft_len", "dare_genre_pools", "dare_router_fit_after"):
        if getattr(settings, name) < 0:
            raise SettingsError(f"LIBER_{name.upper()}={getattr(settings, name)!r}: must be >= 0")
    if not 0 <= settings.dare_min_prob < 1:
        raise SettingsError(f"LIBER_DARE_MIN_PROB={settings.dare_min_prob!r}: must be in [0, 1)")


def pool_dir(settings) -> Path:
    """Where the pools live: LIBER_DARE_POOL_DIR, else STATE/dare-pools."""
    return Path(settings.dare_pool_dir or settings.state_path / "dare-pools")


def open_pools(settings, path: str | Path | None = None) -> PoolStore:
    """The configured pool store in RocksDB (created on first use)."""
    path = Path(path or pool_dir(settings))
    path.parent.mkdir(parents=True, exist_ok=True)
    return PoolStore(str(path), PoolConfig(max_ngram=settings.dare_max_ngram,
                                           max_tokens=settings.dare_pool_max_tokens))


class DareEngine:
    def __init__(self, model, store: PoolStore, router: PoolRouter | None, mode: str = "relaxed",
                 draft_len: int = 15, top_k: int = 2, min_prob: float = 0.1,
                 context_pool: bool = True, stats: DareStats | None = None):
        self.store = store
        self.router = router
        self.decoder = DareDecoder(model, store, "plain" if mode == "off" else mode,
                                   draft_len=draft_len, top_k=top_k, min_prob=min_prob,
                                   context_pool=context_pool, stats=stats)

    @classmethod
    def open(cls, settings, model, path: str | Path | None = None) -> "DareEngine":
        check_settings(settings)
        store = open_pools(settings, path)
        meta = store.get_meta(ROUTER_META)
        router = PoolRouter.from_meta(meta) if meta else None
        if router is not None:
            router.groups_per_request = settings.dare_genre_pools
        return cls(model, store, router, settings.dare_mode, settings.dare_draft_len,
                   settings.dare_top_k, settings.dare_min_prob, bool(settings.dare_context_pool))

    def fit_router(self, vectors: Sequence[Sequence[float]], k: int, groups_per_request: int = 2,
                   seed: int = 0) -> PoolRouter:
        """k-means over user vectors; stored with the pools. Existing cluster pools keep their
        names, so refitting should be followed by letting those pools age out."""
        self.router = PoolRouter(kmeans(vectors, k, seed=seed), groups_per_request)
        self.store.put_meta(ROUTER_META, self.router.to_meta())
        return self.router

    def pools_for(self, user_vector: Sequence[float] | None,
                  item_groups: Sequence[Sequence[str]]) -> list[str]:
        router = self.router or PoolRouter([])   # no clusters fitted yet: item groups only
        return router.pools(user_vector or [], item_groups)

    def generate(self, prompt: Sequence[int], user_vector: Sequence[float] | None,
                 item_groups: Sequence[Sequence[str]],
                 max_new_tokens: int = 128) -> DraftedGeneration:
        pools = self.pools_for(user_vector, item_groups)
        return self.decoder.generate(prompt, pools, max_new_tokens, feed=True)

    def close(self) -> None:
        self.store.close()
