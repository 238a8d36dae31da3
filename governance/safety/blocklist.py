"""Terms operators forbid (edited in the admin as `BlockedTerm`), matched case-insensitively as
whole words or phrases."""

import re
from collections.abc import Iterable, Sequence

from governance.safety.base import Finding

NAME = "blocklist"
PLACEHOLDER = "[BLOCKED]"


def _term_pattern(term: str) -> str:
    # Whitespace inside a phrase matches any run of whitespace; word boundaries only where the
    # term starts or ends with a word character ("c++" has none at its end).
    body = r"\s+".join(re.escape(word) for word in term.split())
    start = r"\b" if re.match(r"\w", term) else ""
    end = r"\b" if re.search(r"\w$", term) else ""
    return f"{start}{body}{end}"


class BlocklistFilter:
    name = NAME
    can_redact = True

    def __init__(self, *, terms: Iterable[str]):
        cleaned = sorted({t.strip() for t in terms if t.strip()}, key=len, reverse=True)
        self.pattern = (
            re.compile("|".join(_term_pattern(t) for t in cleaned), re.I) if cleaned else None
        )

    def scan(self, text: str) -> Sequence[Finding]:
        if self.pattern is None:
            return []
        return [
            Finding(filter=NAME, kind="term", start=m.start(), end=m.end(), placeholder=PLACEHOLDER)
            for m in self.pattern.finditer(text)
        ]

    def describe(self, findings: Sequence[Finding]) -> str:
        return "it contains a term this site does not allow"
