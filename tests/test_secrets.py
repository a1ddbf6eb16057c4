"""Redaction's literal prefilter: a pattern is skipped only where it cannot match, so the
result is the same as running every pattern on every text."""

from __future__ import annotations

import random
import re
from pathlib import Path
from re import _constants as sre_c
from re import _parser as sre_parse

import pytest

from codeadapt import secrets
from codeadapt.secrets import REDACTED, needs, redact_text


def reference(text: str) -> tuple[str, int]:
    """Every pattern on the text, in redaction order, no prefilter (the code before it)."""
    text, n = secrets.PRIVATE_KEY_BLOCK.subn(REDACTED, text)
    for pat in secrets.EXTRA:
        text, k = secrets._sub_secret(pat, text)
        n += k
    for pat in secrets._patterns():
        text, k = pat.subn(REDACTED, text)
        n += k
    return text, n


def sample(items, rng: random.Random, groups: dict[int, str]) -> str:
    """A string the parsed pattern is likely to match (lookarounds ignored)."""
    out = []
    for op, av in items:
        if op is sre_c.LITERAL:
            out.append(chr(av))
        elif op is sre_c.IN:
            out.append(_one_of(av, rng))
        elif op is sre_c.ANY:
            out.append(rng.choice("aZ9_-"))
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
            lo, hi = av[0], min(av[1], av[0] + 4)
            out += [sample(av[2], rng, groups) for _ in range(rng.randint(max(lo, 1 if hi else 0), hi))]
        elif op is sre_c.BRANCH:
            out.append(sample(rng.choice(av[1]), rng, groups))
        elif op is sre_c.SUBPATTERN:
            text = sample(av[3], rng, groups)
            if av[0] is not None:
                groups[av[0]] = text
            out.append(text)
        elif op is sre_c.GROUPREF:
            out.append(groups.get(av, ""))
    return "".join(out)


def _one_of(av, rng: random.Random) -> str:
    chars = []
    for op, x in av:
        if op is sre_c.NEGATE:
            return "x"
        if op is sre_c.LITERAL:
            chars.append(chr(x))
        elif op is sre_c.RANGE:
            chars += [chr(x[0]), chr(x[1]), chr((x[0] + x[1]) // 2)]
        elif op is sre_c.CATEGORY:
            chars += {sre_c.CATEGORY_DIGIT: "07", sre_c.CATEGORY_WORD: "aZ_3",
                      sre_c.CATEGORY_SPACE: " "}.get(x, "q")
    return rng.choice(chars or ["x"])


def planted(seed: int = 0, per_pattern: int = 6) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, text): for each pattern, strings drawn from its own syntax, in contexts a
    secret is written in (assignments, quotes, upper case, a non-ASCII neighbour)."""
    rng = random.Random(seed)
    out = []
    for pat, _, _ in secrets._plan():
        parsed = sre_parse.parse(pat.pattern, pat.flags)
        for _ in range(per_pattern):
            s = sample(parsed, rng, {})
            for text in (s, f'token = "{s}"\n', f"x {s} y", f"# {s.upper()}\n", f"K = '{s}'  # é\n"):
                out.append((pat, text))
    return out


def test_needs_reads_the_literals_every_match_contains():
    assert needs(re.compile(r"\bsk-ant-[A-Za-z0-9_-]{20,}")) == ((frozenset({"sk-ant-"}),), False)
    assert needs(re.compile(r"\b(?:sk|rk)_(?:live|test)_x")) == (
        (frozenset({"sk", "rk"}), frozenset({"_"}), frozenset({"live", "test"}), frozenset({"_x"})), False)
    # optional parts, lookbehinds and empty alternatives require nothing
    assert needs(re.compile(r"(?<=://)(?:ab)?c*(?:d|)")) == ((), False)
    assert needs(re.compile(r"(?:ab){2,}")) == ((frozenset({"ab"}),), False)
    # case-insensitive: lower-cased; a non-ASCII literal gives no set
    assert needs(re.compile(r"AWS.{0,3}KEY", re.I)) == ((frozenset({"aws"}), frozenset({"key"})), True)
    assert needs(re.compile("Straße", re.I)) == ((), True)
    # a group with its own case flag is not read
    assert needs(re.compile(r"(?i:Key)=x")) == ((frozenset({"=x"}),), False)


def test_prefiltered_redaction_equals_every_pattern_on_planted_secrets():
    cases = planted()
    hit = {p.pattern for p, text in cases if p.search(text)}
    # the sampler really draws secrets of (almost) every detector: the test is not vacuous
    assert len(hit) >= len(secrets._plan()) - 6, sorted({p.pattern for p, _ in cases} - hit)
    for pattern, text in cases:
        assert secrets._redact(text) == reference(text), (pattern.pattern, text)


def test_prefiltered_redaction_equals_every_pattern_on_real_source():
    root = Path(secrets.__file__).parent
    texts = [p.read_text() for p in sorted(root.rglob("*.py"))]
    texts += [t.upper() for t in texts[:5]]
    # `re` folds case beyond ASCII: "ſ" (long s) matches "s", and str.lower() keeps it
    folded = "pa\u017f\u017fword = 'hunter2hunter2'"
    assert reference(folded)[1] == 1
    for text in [*texts, folded, "x = 1\n" * 20_000 + folded]:  # the last one over the memo's size
        assert redact_text(text) == secrets._redact(text) == reference(text)


@pytest.mark.parametrize("secret", [
    "AKIA" + "IOSFODNN7EXAMPLE",
    "ghp_" + "a" * 36,
    "sk-ant-" + "b" * 24,
    "xoxb-" + "1234567890-abcdef",
    "eyJ" + "hbGciOiJIUzI1NiJ9" + ".eyJ" + "zdWIiOiIxMjM0In0" + ".c2lnbmF0dXJlc2ln",
])
def test_a_known_secret_is_redacted_in_any_context(secret: str):
    for text in (secret, f"k = '{secret}'", f"é {secret} é", f"{secret}\n" * 3):
        out, n = redact_text(text)
        assert secret not in out and n >= 1, text
