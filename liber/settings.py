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
    # --- worker ------------------------------------------------------------------
    batch_size: int = field(default=500, metadata={"help": "events taken from the stream per batch"})
    batch_within_s: float = field(default=0.2, metadata={"help": "max wait to fill a batch"})
    # --- LLM workers (UIL) ---------------------------------------------------------
    # --- DARE decoding ---------------------------------------------------------------
    # --- ops ---------------------------------------------------------------------
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus port; 0 disables"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "Prometheus bind address"})

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
                     "batch_size", "dedup_window"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("max_gap_s", "max_span_s", "max_future_s", "batch_within_s", "max_lateness_s"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
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

    # --- derived values ------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or os.path.join(self.home, "state"))

    def topic(self, name: str) -> str:
        """Full name of a logical topic (`behaviors`, `items`, ...), with the prefix."""
        return self.topic_prefix + name

    def kafka_client_options(self) -> dict:
        """Security options in kafka-python's spelling (empty for PLAINTEXT)."""
        opts: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            opts.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password)
        if self.ssl_cafile:
            opts["ssl_cafile"] = self.ssl_cafile
        return opts

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
