import os
from pathlib import Path

import pytest

from codeadapt import extract, parallel


@pytest.fixture()
def pool():
    parallel.configure(2)
    yield
    parallel.configure(1)


def _crash(x: int) -> int:
    if x == 3 and os.environ.get("CODEADAPT_TEST_PARENT") != str(os.getpid()):
        os._exit(1)  # a worker that dies, as a native parser might
    return x * x


def test_starmap_keeps_order_and_survives_a_dead_worker(pool, monkeypatch):
    """Asserts: results come back in order; a worker that dies mid-call fails nothing (the
    call runs again here) and the next call gets a working pool."""
    monkeypatch.setenv("CODEADAPT_TEST_PARENT", str(os.getpid()))
    assert parallel.starmap(_crash, [(i,) for i in range(6)]) == [i * i for i in range(6)]
    assert parallel.call(_crash, 4) == 16


def test_chunked_extraction_in_processes_equals_the_inline_one(pool, monkeypatch):
    """Asserts: a checkout cut into many chunks and parsed in worker processes gives the same
    Extraction as one pass in this process (the installed `click`, 16 files)."""
    import click

    root = Path(click.__file__).parent
    inline = extract.extract_checkout(root, "click", "0" * 40)
    monkeypatch.setattr(extract, "CHUNK_BYTES", 20_000)
    chunked = extract.extract_checkout(root, "click", "0" * 40, starmap=parallel.starmap)
    assert chunked == inline and inline.stats["files_parsed"] > 10
