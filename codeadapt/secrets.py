"""Find secrets with detect-secrets' detectors and redact them before anything is written."""

from __future__ import annotations

import functools
import re
from typing import Any

REDACTED = "<REDACTED-SECRET>"
# Detectors for credentials with a recognisable shape. The entropy and keyword detectors flag
# ordinary code (hashes in tests, `password=` parameters) and would rewrite real source.
PLUGINS = (
    "ArtifactoryDetector", "AWSKeyDetector", "AzureStorageKeyDetector", "BasicAuthDetector",
    "CloudantDetector", "DiscordBotTokenDetector", "GitHubTokenDetector", "GitLabTokenDetector",
    "IbmCloudIamDetector", "IbmCosHmacDetector", "JwtTokenDetector", "MailchimpDetector",
    "NpmDetector", "OpenAIDetector", "PrivateKeyDetector", "PypiTokenDetector",
    "SendGridDetector", "SlackDetector", "SoftlayerDetector", "SquareOAuthDetector",
    "StripeDetector", "TelegramBotTokenDetector", "TwilioKeyDetector",
)
# Shapes detect-secrets misses, each redacted whole (or only the group named `s`): current
# provider token formats, credentials inside URLs, quoted literals assigned to a credential
# name (Django's SECRET_KEY, `password = "..."`, hex API keys), JWTs, and a PEM body whose
# BEGIN line is gone.
EXTRA = tuple(re.compile(p) for p in (
    r"\bsk-ant-[A-Za-z0-9_-]{20,}",
    r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,}",
    r"\bgithub_pat_[A-Za-z0-9_]{22,}",
    r"\bgh[pousr]_[A-Za-z0-9]{36,}",
    r"\bglpat-[A-Za-z0-9_-]{20,}",
    r"\bAIza[0-9A-Za-z_-]{35}",
    r"\bhf_[A-Za-z0-9]{30,}",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{20,}",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    r"(?<=://)(?P<s>[^/\s:@'\"]*:[^/\s@'\"]+)(?=@)",
    r"(?i)\b(?:password|passwd|pwd|secret(?:_key)?|api_?key|access_?token|auth_?token|private_?key|"
    r"client_?secret)\w*['\"]?\s*[:=]\s*[rbu]?(?P<q>['\"])(?P<s>[^'\"\s]{8,})(?P=q)",
    r"(?m)(?:^[A-Za-z0-9+/]{60,76}\r?\n){3,}(?:^[A-Za-z0-9+/]{1,76}={0,2}\r?\n?)?",
))


def _sub_secret(pat: re.Pattern[str], text: str) -> tuple[str, int]:
    if "s" not in pat.groupindex:
        return pat.subn(REDACTED, text)
    return pat.subn(lambda m: m.string[m.start():m.start("s")] + REDACTED + m.string[m.end("s"):m.end()], text)


PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN[A-Z ]* PRIVATE KEY[A-Z ]*-----.*?(?:-----END[A-Z ]* PRIVATE KEY[A-Z ]*-----|\Z)", re.S
)


@functools.cache
def _patterns() -> tuple[re.Pattern[str], ...]:
    """The detectors' own regexes; a whole match is redacted, not just its capture group."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    out: list[re.Pattern[str]] = []
    for cls in get_mapping_from_secret_type_to_class().values():
        if cls.__name__ in PLUGINS:
            out += list(getattr(cls(), "denylist", ()))
    return tuple(out)


def needs(pattern: re.Pattern[str]) -> tuple[tuple[frozenset[str], ...], bool]:
    """(sets, folded): every match of `pattern` contains a literal of each set (lower-cased
    when `folded`, for a case-insensitive pattern); no sets where none is known. A string
    that lacks one needs no search: Python's `re` scans for a literal prefix only when a
    pattern starts with one, and a `\\b`, a lookbehind or a case flag in front makes it try
    every position (~30 ms a MB for each of the 59 patterns; `str.find` is ~100x faster)."""
    from re import _constants as sre_c
    from re import _parser as sre_parse

    parsed = sre_parse.parse(pattern.pattern, pattern.flags)
    folded = bool(parsed.state.flags & re.IGNORECASE)
    sets = _required(parsed, sre_c)
    if folded:
        sets = [frozenset(x.lower() for x in c) for c in sets if all(x.isascii() for x in c)]
    return tuple(dict.fromkeys(sets)), folded


def _required(items: Any, sre_c: Any) -> list[frozenset[str]]:
    """Any-of sets of literals every match of the parsed sequence `items` contains."""
    sets: list[frozenset[str]] = []
    cur: list[str] = []
    for op, av in items:
        if op is sre_c.LITERAL:
            cur.append(chr(av))
            continue
        if cur:
            sets.append(frozenset(["".join(cur)]))
            cur = []
        if op is sre_c.SUBPATTERN and not (av[1] | av[2]) & re.IGNORECASE:
            sets += _required(av[3], sre_c)  # a group is matched once
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT) and av[0] >= 1:
            sets += _required(av[2], sre_c)  # repeated at least once
        elif op is sre_c.BRANCH:  # one alternative matches: any of their strongest sets
            alts = [_required(alt, sre_c) for alt in av[1]]
            if all(alts):
                sets.append(frozenset().union(*(max(a, key=_strength) for a in alts)))
    if cur:
        sets.append(frozenset(["".join(cur)]))
    return sets


def _strength(lits: frozenset[str]) -> tuple[int, int]:
    return min(map(len, lits)), -len(lits)


@functools.cache
def _plan() -> tuple[tuple[re.Pattern[str], tuple[frozenset[str], ...], bool], ...]:
    """Every pattern in redaction order (EXTRA before the detectors: a whole JWT, not its
    head): (pattern, the literal sets a match needs, whether they are lower-cased)."""
    return tuple((pat, *needs(pat)) for pat in (PRIVATE_KEY_BLOCK, *EXTRA, *_patterns()))


def redact_text(text: str) -> tuple[str, int]:
    """`text` with every secret replaced, and how many were replaced. A pattern runs only on a
    text that holds the literals it needs (`needs`): the same result as running them all.
    Texts up to 64 kB are memoised: the dataset build redacts each stored message, then
    replays its tool call and redacts the fresh result, the same string wherever there was
    no secret."""
    return _redact_memo(text) if len(text) <= 1 << 16 else _redact(text)


def _redact(text: str) -> tuple[str, int]:
    n = 0
    low: str | None = None
    for pat, sets, folded in _plan():
        if sets and not (folded and not text.isascii()):  # `re` folds beyond ASCII (K, ſ)
            if folded and low is None:
                low = text.lower()
            hay = low if folded else text
            if not all(any(x in hay for x in lits) for lits in sets):
                continue
        text, k = _sub_secret(pat, text)
        if k:
            n += k
            low = None
    return text, n


_redact_memo = functools.lru_cache(maxsize=4096)(_redact)


def redact_url(url: str) -> str:
    """A URL without the credentials in its user-info part (`https://user:token@host/...`)."""
    return re.sub(r"(?<=://)[^/\s@]+(?=@)", REDACTED, url)


def redact(obj: Any) -> tuple[Any, int]:
    """Redact every string inside a JSON-like object; returns (copy, count)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, list | tuple):
        items = [redact(x) for x in obj]
        return type(obj)(i for i, _ in items), sum(c for _, c in items)
    if isinstance(obj, dict):
        items = {k: redact(v) for k, v in obj.items()}
        return {k: v for k, (v, _) in items.items()}, sum(c for _, c in items.values())
    return obj, 0
