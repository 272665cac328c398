"""Build the Config from environment variables and an optional YAML file, with one line per problem."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.config.model import Config

# The seed's environment variables, pool sizes and acquire timeouts (BRIEF §2).
ROLE_ENV = {
    "main": "DATABASE_URL",
    "analytics": "ANALYTICS_DATABASE_URL",
    "documents": "DOCUMENTS_DATABASE_URL",
    "compliance": "COMPLIANCE_DATABASE_URL",
    "read_replica": "READ_REPLICA_DATABASE_URL",
}
# A login per database that may set up logical replication, for `migrate` (roles.<role>.migration_url).
MIGRATION_ENV = {
    "main": "MIGRATION_DATABASE_URL",
    "analytics": "ANALYTICS_MIGRATION_DATABASE_URL",
    "documents": "DOCUMENTS_MIGRATION_DATABASE_URL",
    "compliance": "COMPLIANCE_MIGRATION_DATABASE_URL",
}
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "main": {"pool_size": 20, "acquire_timeout": 30, "fallback": None},
    # A configured domain role that is down is refused (57P03) unless it sets fallback: main; an
    # unconfigured one is always served by main, where its tables live.
    "analytics": {"pool_size": 15, "acquire_timeout": 45, "fallback": None},
    "documents": {"pool_size": 25, "acquire_timeout": 60, "fallback": None},
    "compliance": {"pool_size": 10, "acquire_timeout": 30, "fallback": None},
    "read_replica": {"pool_size": 30, "acquire_timeout": 20, "fallback": "main"},
}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MSG_KEY = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*): (.*)$", re.DOTALL)


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one safe-to-show line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: Path | None, env: Mapping[str, str]) -> Config:
    """Resolve the configuration: defaults, then the YAML file (``${VAR}`` expanded), then env URLs.

    ``env`` is read here and only here: nothing reads the environment after start-up.
    Raises ConfigError listing every problem found.
    """
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
        raw = _expand(raw, env, (), problems)
    raw, env_keys = _with_defaults_and_env(raw, env, problems)
    if problems:
        raise ConfigError(problems)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, env_keys)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError([f"{path}: YAML error{where}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    return data


def _expand(value: Any, env: Mapping[str, str], key: tuple[str | int, ...], problems: list[str]) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in string values; ``$$`` is a literal ``$``."""
    if isinstance(value, dict):
        return {k: _expand(v, env, (*key, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, (*key, i), problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{_dotted(key)}: environment variable {name} is not set")
        return ""

    return _VAR.sub(substitute, value)


def _with_defaults_and_env(
    raw: dict[str, Any], env: Mapping[str, str], problems: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Lay the seed defaults under the file's roles and the env URLs over them."""
    roles = raw.get("roles", {})
    if roles is None:
        roles = {}
    if not isinstance(roles, dict):
        problems.append("roles: must be a mapping of role name to settings")
        return raw, {}
    merged: dict[str, Any] = {}
    for name, section in roles.items():
        if name not in ROLE_DEFAULTS:
            problems.append(f"roles.{name}: unknown role (roles are {', '.join(ROLE_DEFAULTS)})")
        elif section is not None and not isinstance(section, dict):
            problems.append(f"roles.{name}: must be a mapping of settings")
    env_keys: dict[str, str] = {}
    for name, defaults in ROLE_DEFAULTS.items():
        section = roles.get(name)
        role = {**defaults, **(section if isinstance(section, dict) else {})}
        url = env.get(ROLE_ENV[name], "").strip()
        if url:
            role["url"] = url
            role.pop("replicas", None)
            env_keys[f"roles.{name}.url"] = ROLE_ENV[name]
        migration = env.get(MIGRATION_ENV.get(name, ""), "").strip()
        if name in MIGRATION_ENV and migration:
            role["migration_url"] = migration
            env_keys[f"roles.{name}.migration_url"] = MIGRATION_ENV[name]
        merged[name] = role
    return {**raw, "roles": merged}, env_keys


def _describe(exc: ValidationError, env_keys: Mapping[str, str]) -> list[str]:
    """One line per validation error: ``key.path: problem``; never the offending value itself."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        key = _dotted(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        found = _MSG_KEY.match(msg)
        if found and err["type"] == "value_error":  # a model validator naming a sub-key
            key = f"{key}.{found.group(1)}" if key else found.group(1)
            msg = found.group(2)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "missing"
        source = env_keys.get(key)
        lines.append(f"{key} (from {source}): {msg}" if source else f"{key}: {msg}")
    return lines


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
