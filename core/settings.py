"""One settings object for every LIBER-Stream process.

Values come from, in rising priority: the defaults below, an optional TOML file
(`--config PATH` or `LIBER_CONFIG`), and environment variables `LIBER_<NAME>`.
`Settings.load()` validates everything at start; an invalid value raises
`SettingsError` whose message is one line naming the setting.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "LIBER_"
# the prompt templates llm_workers/prompts.py knows (a test keeps the two lists equal)
TEMPLATES = ("uil-compact-v5", "uil-compact-v4", "uil-compact-v3", "uil-kar-v2")


class SettingsError(ValueError):
    """A setting has an invalid value; the message names it."""


def _default_home() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "liber-stream")


@dataclass(frozen=True)
class Settings:
    # --- where things live -------------------------------------------------------
    home: str = field(default_factory=_default_home,
                      metadata={"help": "cache for Kafka jars, datasets, models (outside the repo)"})
    state_dir: str = field(default="", metadata={"help": "RocksDB state; default HOME/state"})
    # --- Kafka -------------------------------------------------------------------
    bootstrap_servers: str = field(default="127.0.0.1:9092",
                                   metadata={"help": "comma-separated host:port list"})
    topic_prefix: str = field(default="", metadata={"help": "prefix for every topic name"})
    app_id: str = field(default="liber-stream", metadata={"help": "Faust app id / consumer group"})
    topic_partitions: int = field(default=4, metadata={"help": "partitions of created topics"})
    replication_factor: int = field(default=1, metadata={"help": "replication of created topics"})
    security_protocol: str = field(default="PLAINTEXT",
                                   metadata={"help": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"})
    sasl_mechanism: str = field(default="", metadata={"help": "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"})
    sasl_username: str = field(default="", metadata={"help": "SASL user", "secret": False})
    sasl_password: str = field(default="", metadata={"help": "SASL password", "secret": True})
    ssl_cafile: str = field(default="", metadata={"help": "CA bundle for SSL"})
    # --- input validation --------------------------------------------------------
    max_payload_bytes: int = field(default=64 * 1024,
                                   metadata={"help": "larger records are dead-lettered (oversize)"})
    max_future_s: float = field(default=24 * 3600.0,
                                metadata={"help": "events this far past wall-clock now are rejected"})
    # --- UBSP partition close rules -----------------------------------------------
    max_events: int = field(default=20, metadata={"help": "close a cache at this many events"})
    max_gap_s: float = field(default=6 * 3600.0,
                             metadata={"help": "close when the user is idle this long (event time)"})
    max_span_s: float = field(default=30 * 24 * 3600.0,
                              metadata={"help": "close when the cache is this old (event time)"})
    max_lateness_s: float = field(default=3600.0,
                                  metadata={"help": "older events (vs the user's newest) are dead-lettered as late"})
    dedup_window: int = field(default=64, metadata={"help": "recent event ids kept per user to drop duplicates"})
    min_gap_events: int = field(
        default=5, metadata={"help": "the gap rule closes only caches of at least this many events; "
                                     "smaller ones wait for the user's next session (1: every cache)"})
    drift_threshold: float = field(
        default=0.55,
        metadata={"help": "close when 1 - cos(cache centroid, new item text vector) exceeds this; "
                          "0 disables (0.55: p99 on MovieLens-1M, see streams/drift.py)"})
    drift_min_events: int = field(default=5, metadata={"help": "drift closes only caches of at least this many events"})
    # --- worker ------------------------------------------------------------------
    batch_size: int = field(default=8000, metadata={"help": "events taken from the stream per batch"})
    # --- LLM workers (UIL) ---------------------------------------------------------
    llm_backend: str = field(default="auto",
                             metadata={"help": "auto (vllm when installed, else transformers), transformers, vllm, vllm-server, failing (tests: injects failures) or module:factory"})
    llm_model: str = field(default="smollm2-135m-instruct",
                           metadata={"help": "default SmolLM2-135M-Instruct, or a local model directory"})
    llm_device: str = field(default="cpu", metadata={"help": "torch device of the transformers backend"})
    llm_dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CPUs with AMX or AVX-512 BF16 and on GPUs, else float32), float32, bfloat16 or float16"})
    llm_threads: int = field(default=1, metadata={"help": "torch CPU threads; 0 = torch's default"})
    llm_mode: str = field(default="cascade",
                          metadata={"help": "cascade (UIL) or naive (whole history each close, baseline)"})
    llm_max_new_tokens: int = field(default=64, metadata={"help": "answer length cap (tokens; the two v3 lines need about 55)"})
    llm_repetition_penalty: float = field(default=1.0, metadata={"help": "1.0 disables (the default; README: DARE)"})
    llm_template: str = field(
        default="uil-compact-v5",
        metadata={"help": "prompt template: uil-compact-v5 (v4 without middling titles, "
                          "answers in plain prose), uil-compact-v4 (v3 in fewer words, bare "
                          "titles, genres and years summed up), uil-compact-v3 (two short lines, "
                          "static instructions first) or uil-kar-v2 (the earlier three-line one)"})
    llm_no_repeat_ngram: int = field(
        default=3, metadata={"help": "ban an n-gram repeated inside one answer (tokens compared "
                                     "as a reader sees them; the prompt may be copied); 0 "
                                     "disables"})
    llm_batch_size: int = field(default=0, metadata={"help": "max partitions per LLM call; 0 = the backend's best (vllm 64, transformers 16)"})
    llm_batch_wait_s: float = field(default=0.2, metadata={"help": "max wait to fill a batch"})
    llm_max_queue: int = field(default=256,
                               metadata={"help": "partitions held in memory; the consumer pauses above"})
    llm_concurrency: int = field(default=1, metadata={"help": "LLM calls in flight at once"})
    llm_timeout_s: float = field(default=120.0, metadata={"help": "per-call time limit"})
    llm_max_attempts: int = field(default=3,
                                  metadata={"help": "tries per partition before partitions.closed.dlq"})
    llm_retry_backoff_s: float = field(default=1.0,
                                       metadata={"help": "first retry delay; doubles, capped at 60 s"})
    llm_budget_tpm: int = field(default=0,
                                metadata={"help": "token budget per minute (in+out); 0 = unlimited"})
    llm_price_in_per_1k: float = field(default=0.0, metadata={"help": "cost per 1k prompt tokens"})
    llm_price_out_per_1k: float = field(default=0.0, metadata={"help": "cost per 1k generated tokens"})
    llm_collective_min_users: int = field(
        default=3, metadata={"help": "cold users of a cluster before its collective summary; 0 = off"})
    llm_max_title_chars: int = field(default=120, metadata={"help": "item titles are cut to this"})
    llm_max_summary_chars: int = field(default=600, metadata={"help": "summaries are cut to this"})
    llm_max_prompt_tokens: int = field(
        default=7000, metadata={"help": "naive mode drops the oldest history to fit this"})
    llm_fail_marker: str = field(default="",
                                 metadata={"help": "failing backend: prompts containing this fail"})
    llm_fail_first: int = field(default=0, metadata={"help": "failing backend: first N calls fail"})
    llm_url: str = field(default="", metadata={"help": "vllm-server backend: base URL of an OpenAI-compatible vLLM server"})
    llm_vllm_kv_cache_mb: int = field(default=512, metadata={"help": "vllm backend: KV cache size (MiB)"})
    llm_vllm_speculative: str = field(default="off", metadata={"help": "vllm backend: off, dare (pools; LIBER_DARE_MODE), ngram or suffix"})
    llm_dare: int = field(default=0, metadata={"help": "transformers backend: 1 decodes through DARE (LIBER_DARE_MODE strict or relaxed; off = plain)"})
    # --- DARE decoding ---------------------------------------------------------------
    dare_mode: str = field(default="relaxed", metadata={"help": "off, strict (lossless) or relaxed"})
    dare_draft_len: int = field(default=15, metadata={"help": "most draft tokens verified per step"})
    dare_top_k: int = field(default=2, metadata={"help": "relaxed: draft token must be in the top k"})
    dare_min_prob: float = field(default=0.1, metadata={"help": "relaxed: and have probability above this"})
    dare_clusters: int = field(default=8, metadata={"help": "user clusters (k-means), one pool each"})
    dare_router_fit_after: int = field(default=500, metadata={"help": "fit the user clusters on the first N partitions routed, if none are stored (0: never)"})
    dare_genre_pools: int = field(default=2, metadata={"help": "item-group pools read per request"})
    dare_max_ngram: int = field(default=8, metadata={"help": "longest context suffix matched in a pool"})
    dare_pool_max_tokens: int = field(default=50_000, metadata={"help": "per-pool bound (oldest evicted)"})
    dare_context_pool: int = field(default=1, metadata={"help": "1: also draft from the request's own text"})
    dare_pool_dir: str = field(default="", metadata={"help": "RocksDB of the pools; default STATE/dare-pools"})
    # --- fusion worker (UIF) ---------------------------------------------------------
    fusion_batch_size: int = field(default=256,
                                   metadata={"help": "most input records per micro-batch (one model call)"})
    fusion_model_dir: str = field(default="",
                                  metadata={"help": "interest model artifact; default: models.artifact's"})
    # --- ops ---------------------------------------------------------------------
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus port; 0 disables"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "Prometheus bind address"})
    lag_interval_s: float = field(default=5.0,
                                  metadata={"help": "how often consumer lag is read from Kafka"})

    # ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: dict | None = None,
             **overrides) -> "Settings":
        """Defaults < TOML file < LIBER_* environment < explicit overrides; then validate."""
        env = os.environ if env is None else env
        path = path or env.get(ENV_PREFIX + "CONFIG")
        raw: dict[str, object] = {}
        if path:
            try:
                with open(path, "rb") as fh:
                    raw.update(tomllib.load(fh))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError(f"LIBER_CONFIG: cannot read {path}: {exc}") from None
        names = {f.name: f for f in fields(cls)}
        for key in raw:
            if key not in names:
                raise SettingsError(f"{key}: unknown setting in {path}")
        for name in names:
            if ENV_PREFIX + name.upper() in env:
                raw[name] = env[ENV_PREFIX + name.upper()]
        raw.update({k: v for k, v in overrides.items() if v is not None})
        values = {name: _coerce(names[name], value) for name, value in raw.items()}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"{ENV_PREFIX}{name.upper()}={getattr(self, name)!r}: {why}")

        for name in ("topic_partitions", "replication_factor", "max_payload_bytes", "max_events",
                     "batch_size", "dedup_window", "min_gap_events", "fusion_batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("max_gap_s", "max_span_s", "max_future_s", "max_lateness_s", "lag_interval_s"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if not 0 <= self.drift_threshold <= 2:
            raise bad("drift_threshold", "must be in [0, 2] (a cosine distance; 0 disables)")
        if self.drift_min_events < 1:
            raise bad("drift_min_events", "must be >= 1")
        if not 0 <= self.metrics_port <= 65535:
            raise bad("metrics_port", "must be a port number (0 disables)")
        if not self.bootstrap_servers.strip():
            raise bad("bootstrap_servers", "must not be empty")
        for server in self.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise bad("bootstrap_servers", f"{server!r} is not host:port")
        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise bad("security_protocol", "must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism not in (
                "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise bad("sasl_mechanism", "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with SASL")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise bad("log_level", "must be DEBUG, INFO, WARNING or ERROR")
        if not self.app_id or any(c.isspace() for c in self.app_id):
            raise bad("app_id", "must be a non-empty name without spaces")
        for name in ("llm_max_new_tokens", "llm_max_queue", "llm_concurrency",
                     "llm_max_attempts", "llm_max_title_chars", "llm_max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.llm_template not in TEMPLATES:
            raise bad("llm_template", "must be " + ", ".join(TEMPLATES[:-1])
                      + " or " + TEMPLATES[-1])
        if self.llm_no_repeat_ngram < 0:
            raise bad("llm_no_repeat_ngram", "must be >= 0 (0 disables)")
        if self.llm_max_summary_chars < 80:
            raise bad("llm_max_summary_chars", "must be >= 80")
        for name in ("llm_batch_wait_s", "llm_timeout_s", "llm_repetition_penalty"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        for name in ("llm_threads", "llm_batch_size", "llm_budget_tpm", "llm_collective_min_users", "llm_fail_first",
                     "llm_retry_backoff_s", "llm_price_in_per_1k", "llm_price_out_per_1k"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.llm_mode not in ("cascade", "naive"):
            raise bad("llm_mode", "must be cascade or naive")
        if self.llm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise bad("llm_dtype", "must be auto, float32, bfloat16 or float16")
        if not self.llm_backend.strip() or any(c.isspace() for c in self.llm_backend):
            raise bad("llm_backend", "must be a backend name or module:factory")
        if self.llm_dare not in (0, 1):
            raise bad("llm_dare", "must be 0 or 1")
        if self.llm_vllm_speculative not in ("off", "dare", "ngram", "suffix"):
            raise bad("llm_vllm_speculative", "must be off, dare, ngram or suffix")
        if self.llm_vllm_kv_cache_mb < 16:
            raise bad("llm_vllm_kv_cache_mb", "must be >= 16")

    # --- derived values ------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or os.path.join(self.home, "state"))

    def topic(self, name: str) -> str:
        """Full name of a logical topic (`behaviors`, `items`, ...), with the prefix."""
        return self.topic_prefix + name

    def summary(self) -> dict:
        """All settings for a start-up log line, secrets masked."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and value else value
        return out

    def to_env(self) -> dict[str, str]:
        """These settings as LIBER_* variables, to start another process with the same config."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes) -> "Settings":
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def replace_text(self, values: dict[str, str]) -> "Settings":
        """`replace` with values written as in the environment: {"llm_dtype": "bfloat16"}
        (names with or without the LIBER_ prefix, any case)."""
        names = {f.name: f for f in fields(self)}
        changes = {}
        for key, text in values.items():
            name = key.lower().removeprefix(ENV_PREFIX.lower())
            if name not in names:
                raise SettingsError(f"{key}: unknown setting")
            changes[name] = _coerce(names[name], text)
        return self.replace(**changes)


def _coerce(f: dataclasses.Field, value: object) -> object:
    """Turn a TOML or environment value into the field's type, naming the setting on failure."""
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[f.type]
    name = ENV_PREFIX + f.name.upper()
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    if kind is str:
        return str(value)
    try:
        if isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={value!r}: must be {'an integer' if kind is int else 'a number'}") from None
