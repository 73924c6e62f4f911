"""What makes two result files the same run: the method's config variant and config digest.

A result records, next to the method's effective config (``result["method"]["config"]``):

- ``variant``: ``None`` when the method ran with its shipped config, else a short name of the
  config variant (the config file's own name when it declares one, else ``cfg-<8 hex>``);
- ``config_sha256``: :func:`config_digest` of that config.

Files written before these keys existed read as variant ``None`` and the digest computed from
their config, so old and new files of the same run agree. The writer (:mod:`ovseg_bench.results`)
and every reader (api, leaderboard, regress, compare) go through these functions, so the digest
means the same thing everywhere.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def config_digest(config: Mapping[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of ``config`` (sorted keys, no spaces).

    Canonical so that key order and indentation of the file never change the digest; tuples and
    lists give the same digest, as they do once written to JSON.
    """
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def method_variant(result: Mapping[str, Any]) -> str | None:
    """The result's config variant; ``None`` for the shipped config and for files without the key."""
    variant = result.get("method", {}).get("variant")
    return variant if isinstance(variant, str) and variant else None


def result_config_digest(result: Mapping[str, Any]) -> str:
    """The recorded ``config_sha256``, else :func:`config_digest` of the recorded config (older files)."""
    method = result.get("method", {})
    recorded = method.get("config_sha256")
    if isinstance(recorded, str) and recorded:
        return recorded
    return config_digest(method.get("config") or {})
