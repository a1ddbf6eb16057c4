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
    for pat in _patterns():
        text, k = pat.subn(REDACTED, text)
        n += k
    return text, n


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
