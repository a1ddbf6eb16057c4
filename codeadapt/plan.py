"""What a phase run must do, decided from config alone (so it is stable when a source fails)."""

from __future__ import annotations

from codeadapt.config import Settings


def spread(total: int, names: list[str]) -> dict[str, int]:
    """Split `total` across `names` as evenly as possible, remainder to the first names."""
    if not names:
        return {}
    q, r = divmod(total, len(names))
    return {n: q + (1 if i < r else 0) for i, n in enumerate(sorted(names))}


def source_quotas(settings: Settings) -> dict[str, dict[str, int]]:
    """Per python source: how many grep/read/direct examples it owes its group's budget."""
    out: dict[str, dict[str, int]] = {}
    srcs = settings.active_sources()
    for gname, group in settings.groups.items():
        members = [n for n, s in srcs.items() if s.group == gname and s.generator == "python"]
        budget = group.budget.model_dump()
        per = {fam: spread(total, members) for fam, total in budget.items()}
        for n in members:
            out[n] = {fam: per[fam][n] for fam in budget}
    return out
