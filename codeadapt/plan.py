"""What a phase run must do, decided from config alone (so it is stable when a source fails)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from codeadapt import chat, examples, extract, handwritten, html_domain
from codeadapt.config import Settings
from codeadapt.records import Checkout


def spread(total: int, names: list[str]) -> dict[str, int]:
    """Split `total` across `names` as evenly as possible, remainder to the first names."""
    if not names:
        return {}
    q, r = divmod(total, len(names))
    return {n: q + (1 if i < r else 0) for i, n in enumerate(sorted(names))}


def source_quotas(settings: Settings) -> dict[str, dict[str, int]]:
    """Per python source: how many grep/read/explain examples it owes its group's budget."""
    out: dict[str, dict[str, int]] = {}
    srcs = settings.active_sources()
    for gname, group in settings.groups.items():
        members = [n for n, s in srcs.items() if s.group == gname and s.generator == "python"]
        budget = group.budget.model_dump()
        per = {fam: spread(total, members) for fam, total in budget.items()}
        for n in members:
            out[n] = {fam: per[fam][n] for fam in budget}
    return out


def versions() -> dict[str, str]:
    """Every generator version and the example format: part of each dataset's inputs."""
    return {"extractor": extract.EXTRACTOR_VERSION, "python": examples.GENERATOR_VERSION,
            "html": html_domain.HTML_GENERATOR_VERSION, "handwritten": handwritten.HANDWRITTEN_VERSION,
            "format": chat.format_key()}


def handwritten_files(settings: Settings, phase: str) -> dict[str, Path]:
    """Hand-written example files of `phase`'s groups, by path relative to the project."""
    files = [settings.resolve(f) for g in settings.phase_groups(phase) for f in settings.groups[g].handwritten]
    return {os.path.relpath(f, settings.root): f for f in files}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def phase_inputs(settings: Settings, phase: str, checkouts: dict[str, Checkout],
                 failures: dict[str, str]) -> dict[str, Any]:
    """What `phase`'s dataset is built from; its hash decides whether to rebuild."""
    from codeadapt.dataset import checkout_inputs

    members = list(settings.phase_sources(phase))
    hand = handwritten_files(settings, phase)
    groups = settings.phase_groups(phase)
    return {
        "sources": checkout_inputs({n: checkouts[n] for n in members if n in checkouts}),
        "failed_sources": {n: failures[n] for n in [*members, *hand] if n in failures},
        "handwritten": {rel: _sha(f) for rel, f in hand.items()},
        "groups": {g: settings.groups[g].model_dump() for g in groups},
        "limits": settings.limits.model_dump(),
        "seed": settings.seed,
        "versions": versions(),
    }
