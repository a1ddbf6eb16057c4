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


def redact_text(text: str) -> tuple[str, int]:
    """`text` with every secret replaced, and how many were replaced."""
    text, n = PRIVATE_KEY_BLOCK.subn(REDACTED, text)
    for pat in EXTRA:  # first: a whole JWT, before a detector takes only its head
        text, k = _sub_secret(pat, text)
        n += k
    for pat in _patterns():
        text, k = pat.subn(REDACTED, text)
        n += k
    return text, n


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
