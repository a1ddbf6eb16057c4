"""Per-source example generation as the data tasks run it: generated, then redacted before
Prefect persists the result (the dataset build redacts again, and replays against redacted
tool output). Module-level functions, so a worker process (`parallel`) can run them without
importing Prefect."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from codeadapt import examples
from codeadapt.records import Example
from codeadapt.secrets import redact


def redacted(made: tuple[list[Example], dict[str, int]]) -> tuple[list[Example], dict[str, int]]:
    """Examples with secrets redacted, the count added to their stats."""
    exs, stats = made
    out = []
    for ex in exs:
        msgs, n = redact(list(ex.messages))
        stats["secrets_redacted_at_generation"] = stats.get("secrets_redacted_at_generation", 0) + n
        out.append(replace(ex, messages=tuple(msgs)) if n else ex)
    return out, stats


def python_examples(*args: Any) -> tuple[list[Example], dict[str, int]]:
    """`examples.python_examples(*args)`, redacted."""
    return redacted(examples.python_examples(*args))
