"""Configuration: one immutable object built from env vars and an optional YAML file, validated once."""

from proxy.config.dsn import Dsn, DsnError, parse_dsn, redact_url
from proxy.config.loader import ROLE_DEFAULTS, ROLE_ENV, ConfigError, load_config
from proxy.config.model import (
    Config,
    DomainsConfig,
    HealthConfig,
    ReadReplicaConfig,
    ReplicaConfig,
    RoleConfig,
)
from proxy.config.values import DOMAINS, ROLES, TableRef, format_duration, parse_duration

__all__ = [
    "DOMAINS",
    "ROLES",
    "ROLE_DEFAULTS",
    "ROLE_ENV",
    "Config",
    "ConfigError",
    "DomainsConfig",
    "Dsn",
    "DsnError",
    "HealthConfig",
    "ReadReplicaConfig",
    "ReplicaConfig",
    "RoleConfig",
    "TableRef",
    "format_duration",
    "load_config",
    "parse_dsn",
    "parse_duration",
    "redact_url",
]
