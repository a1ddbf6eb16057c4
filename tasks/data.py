"""Thin Prefect tasks around the data-engine functions in `codeadapt`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.context import TaskRunContext

from codeadapt import (
    chat,
    dataset,
    examples,
    extract,
    generate,
    handwritten,
    html_domain,
    parallel,
    sources,
)
from codeadapt.budget import Budget
from codeadapt.config import SourceSpec
from codeadapt.records import Checkout, Example, Extraction, SyncFailure
from codeadapt.secrets import redact_text, redact_url


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


# Examples embed the system prompt and tool schemas: a change to either is a new output.
FORMAT_KEY = chat.format_key()


def _checkout_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """Content key: source, origin, commit and every parameter but paths and the parse."""
    co: Checkout = params["checkout"]
    rest = sorted((k, repr(v)) for k, v in params.items() if k not in {"checkout", "extraction"})
    return _key(co.name, co.origin, co.commit, co.generator, extract.EXTRACTOR_VERSION,
                examples.GENERATOR_VERSION, html_domain.HTML_GENERATOR_VERSION, FORMAT_KEY, rest)


CHECKOUT_CACHE = CacheKeyFnPolicy(cache_key_fn=_checkout_key) + TASK_SOURCE


def _retry_transient(task, task_run, state) -> bool:
    """Retry network hiccups, not bad input (a SourceError says what is wrong)."""
    try:
        state.result()
    except sources.SourceError:
        return False
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_transient,
      task_run_name="sync_repo[{name}]", tags=["io"])
def sync_repo(name: str, spec: SourceSpec, repos_dir: Path, project_root: Path) -> Checkout:
    return sources.sync_source(name, spec, repos_dir, project_root)


@task(cache_policy=CHECKOUT_CACHE, persist_result=True, task_run_name="extract_repo[{checkout.name}]")
def extract_repo(checkout: Checkout, max_file_bytes: int) -> Extraction:
    return extract.extract_checkout(Path(checkout.path), checkout.name, checkout.commit, max_file_bytes,
                                    starmap=parallel.starmap)


@task(cache_policy=CHECKOUT_CACHE, persist_result=True, task_run_name="make_examples[{checkout.name}]")
def make_examples(checkout: Checkout, extraction: Extraction, quotas: dict[str, int],
                  limits: examples.Limits, seed: str) -> tuple[list[Example], dict[str, int]]:
    return parallel.call(generate.python_examples, Path(checkout.path), extraction, quotas, limits, seed)


@task(cache_policy=CHECKOUT_CACHE, persist_result=True, task_run_name="html_examples[{checkout.name}]")
def html_examples(checkout: Checkout, seed: str, split: tuple[float, float, str] | None = None
                  ) -> tuple[list[Example], dict[str, int]]:
    return generate.redacted(html_domain.html_examples(Path(checkout.path), checkout.name, checkout.commit, seed, split))


@task(task_run_name="load_handwritten[{path.name}]")
def load_handwritten(path: Path) -> list[Example]:
    return handwritten.load_handwritten(path)


# No Prefect cache: hashing tens of thousands of examples as inputs took minutes at 1,000
# sources, and the build has its own up-to-date check (`dataset.up_to_date`).
@task(task_run_name="build_dataset[{phase}]", cache_policy=NO_CACHE)
def build_dataset(phase: str, items: list[Example], checkouts: dict[str, Checkout], out_dir: Path,
                  split_cfg: dict[str, Any], inputs: dict[str, Any],
                  upstream_stats: dict[str, dict[str, int]], budget: Budget | None = None) -> dict[str, Any]:
    return dataset.build_dataset(phase, items, checkouts, out_dir, split_cfg, inputs, upstream_stats, budget)


def failure_of(name: str, spec: SourceSpec, exc: BaseException) -> SyncFailure:
    origin = spec.url or spec.dist or spec.path or ""
    return SyncFailure(name=name, origin=redact_url(origin), error=redact_text(str(exc))[0])
