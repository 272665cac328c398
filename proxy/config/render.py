"""Show a resolved Config as YAML for people (``check``): every secret redacted, durations readable."""

from __future__ import annotations

from typing import Any

import yaml

from proxy.config.dsn import redact_url
from proxy.config.model import Config, RoleConfig
from proxy.config.values import DOMAINS, ROLES, format_duration


def _role(role: RoleConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "url": redact_url(role.url) if role.url else None,
        "pool_size": role.pool_size,
        "acquire_timeout": format_duration(role.acquire_timeout),
        "idle_timeout": format_duration(role.idle_timeout),
        "max_lifetime": format_duration(role.max_lifetime),
        "fallback": role.fallback,
    }
    if role.migration_url is not None:  # shown only where set: most configurations never migrate
        out["migration_url"] = redact_url(role.migration_url)
    replicas = getattr(role, "replicas", ())
    if replicas:
        del out["url"]
        out["replicas"] = [
            {"name": r.name, "url": redact_url(r.url), "pool_size": r.pool_size or role.pool_size}
            for r in replicas
        ]
    return out


def config_as_dict(config: Config) -> dict[str, Any]:
    """A plain, secret-free dict of the configuration, in the file's layout."""
    health = config.health
    return {
        "listen": config.listen.model_dump(),
        "admin": config.admin.model_dump(),
        "auth": {
            "method": config.auth.method,
            "users_file": str(config.auth.users_file) if config.auth.users_file else None,
            "admin_users": list(config.auth.admin_users),
        },
        "roles": {name: _role(config.roles.get(name)) for name in ROLES},
        "domains": {d: [str(ref) for ref in getattr(config.domains, d)] for d in DOMAINS},
        "routing": {
            "read_only_functions": list(config.routing.read_only_functions),
            "read_your_writes": {
                "scope": config.routing.read_your_writes.scope,
                "max_wait": format_duration(config.routing.read_your_writes.max_wait),
            },
        },
        "statements": config.statements.model_dump(),
        "health": {
            "interval": format_duration(health.interval),
            "timeout": format_duration(health.timeout),
            "failures_before_down": health.failures_before_down,
            "successes_before_up": health.successes_before_up,
            "max_replica_lag": format_duration(health.max_replica_lag),
            "max_replica_lag_bytes": health.max_replica_lag_bytes,
        },
        "log": {"format": config.log.format, "level": config.log.level},
        "limits": {
            "max_client_connections": config.limits.max_client_connections,
            "max_message_length": config.limits.max_message_length,
            "login_timeout": format_duration(config.limits.login_timeout),
            "drain_timeout": format_duration(config.limits.drain_timeout),
        },
        "audit": {"path": str(config.audit.path) if config.audit.path else None},
        "migration": {
            "cutover_timeout": format_duration(config.migration.cutover_timeout),
            "shadow_sample": config.migration.shadow_sample,
        },
        "tls": {
            "mode": config.tls.mode,
            "cert_file": str(config.tls.cert_file) if config.tls.cert_file else None,
            "key_file": str(config.tls.key_file) if config.tls.key_file else None,
            "min_version": config.tls.min_version,
        },
    }


def render_config(config: Config) -> str:
    """The resolved configuration as annotated YAML; unconfigured roles say where their traffic goes."""
    text = yaml.safe_dump(config_as_dict(config), sort_keys=False, default_flow_style=False)
    lines = ["# parafort-proxy: configuration is valid; resolved values below (secrets redacted)"]
    unconfigured = [n for n in ROLES if not config.roles.get(n).configured]
    for name in unconfigured:
        lines.append(
            f"# role {name}: not configured; its traffic goes to {config.roles.get(name).fallback or 'main'}"
        )
    return "\n".join(lines) + "\n" + text
