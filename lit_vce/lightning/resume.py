"""Resuming a run folder safely: what decides a sample's output (the run's fingerprint),
stored canonically and hashed in ``run.json`` and in every sample record, and the check
that refuses to resume a folder whose finished samples were made under another
configuration (:func:`check_resume`)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def canonical_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as stored and hashed: JSON types, and no key whose value is ``None``.

    An option added later with a default of ``None`` (off) changes no output, so it must not
    set a run made before it apart from the same run made after it (``data.attribute`` did).
    Likewise a setting a method retired (``retired_settings``: DiG-IN's ``speedups``) is dropped
    where it was recorded at the value that remains.
    """

    def drop(v):
        return {k: drop(x) for k, x in v.items() if x is not None} if isinstance(v, dict) else v

    out = drop(json.loads(json.dumps(fingerprint, default=str)))  # tuples -> lists, as stored
    method = out.get("method")
    if isinstance(method, dict) and isinstance(method.get("name"), str):
        from ..registry import METHODS

        # a retired setting recorded at the one value that remains changes no output
        retired = getattr(METHODS.get(method["name"]), "retired_settings", {}) if method["name"] in METHODS else {}
        out["method"] = {k: v for k, v in method.items() if not (k in retired and v == retired[k])}
    return out


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """A short, stable hash of a run's fingerprint (stored in every sample record)."""
    import hashlib

    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resume(writer, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """Compare ``fingerprint`` (what decides a sample's output) with the folder's ``run.json``
    and with the fingerprint hash of every finished sample.

    Returns the record to write (the fingerprint, its hash, and the earlier attempts).
    Raises :class:`~lit_vce.errors.ConfigError` naming the differing keys when finished
    samples exist under another configuration (or under none that can be told) and
    ``writer.resume`` is not ``"force"``.
    """
    path = writer.output_dir / "run.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        old = {}
        if writer.done_ids() and writer.resume != "force":
            raise ConfigError(
                f"{path} is unreadable ({e}): the configuration of the {len(writer.done_ids())} samples in "
                f"{writer.output_dir} cannot be checked. Use another --writer.output_dir, or --writer.resume "
                "force to mix them anyway"
            ) from None
    if fingerprint is None:
        return {**old, "fingerprint": None, "fingerprint_hash": None}
    fp = canonical_fingerprint(fingerprint)
    h = fingerprint_hash(fp)
    done = writer.done_ids()
    forced = bool(old.get("forced"))
    # hashes of fingerprints equal to this one up to None-valued keys (records of older versions)
    same = {x for x in old.get("equivalent_hashes", []) if isinstance(x, str)} if done else set()
    if done:
        recorded = old.get("fingerprint") or None
        rec_hash = fingerprint_hash(recorded) if recorded else None
        if recorded and canonical_fingerprint(recorded) == fp and rec_hash != h:
            same.add(rec_hash)
        counts: dict[str | None, int] = {}
        for r in writer._records():
            # a record without a hash (an older version) is judged by run.json's fingerprint
            k = r.get("run_fingerprint") or rec_hash
            counts[k] = counts.get(k, 0) + 1
        foreign = {k: c for k, c in counts.items() if k != h and k not in same}
        if foreign and writer.resume != "force":
            if recorded and canonical_fingerprint(recorded) != fp:
                a, b = _flatten(canonical_fingerprint(recorded)), _flatten(fp)
                diff = sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))
                shown = ", ".join(f"{k} ({a.get(k, _ABSENT)!r} -> {b.get(k, _ABSENT)!r})" for k in diff[:6])
                shown += " ..." if len(diff) > 6 else ""
            elif None in foreign:
                shown = f"{foreign[None]} of them without a record of their configuration (no run.json)"
            else:
                shown = f"{sum(foreign.values())} of them made under another configuration than run.json records"
            raise ConfigError(
                f"{writer.output_dir} holds {len(done)} samples of a run with another configuration: "
                f"{shown}. Use another --writer.output_dir, or --writer.resume force to mix them anyway"
            )
        forced = forced or bool(foreign)
    out = {
        "fingerprint": fp,
        "fingerprint_hash": h,
        "attempts": int(old.get("attempts", 0)) if done else 0,
        "forced": forced,
    }
    if same - {h}:
        out["equivalent_hashes"] = sorted(same - {h})
    return out
