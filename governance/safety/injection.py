"""Prompt-injection scoring: instruction-override and role-play markers, hidden text, and
encoded payloads that decode to instructions.

Each signal has a weight; the score combines them as independent evidence,
`1 - prod(1 - weight)`, so one strong marker or several weak ones pass the threshold, while
one weak marker ("you are now", which benign text uses too) does not.
"""

import base64
import binascii
import math
import re
import unicodedata
from collections.abc import Sequence

from governance.safety.base import Finding

NAME = "injection"

_I = re.I | re.M
_MARKERS: list[tuple[str, float, re.Pattern[str]]] = [
    (
        "override",
        0.75,
        re.compile(
            r"\b(?:ignore|disregard|forget|override|bypass|skip)\b[^.\n]{0,40}?"
            r"\b(?:previous|prior|above|earlier|preceding|all|any|your|the|these|those|system)\b"
            r"[^.\n]{0,30}?\b(?:instructions?|prompts?|rules|directives|guidelines|guardrails"
            r"|safety (?:rules|filters|guidelines))\b",
            _I,
        ),
    ),
    (
        "new_instructions",
        0.5,
        re.compile(
            r"\b(?:new|updated|real|actual|true) (?:system )?(?:instructions?|rules|task)\s*:", _I
        ),
    ),
    (
        "prompt_leak",
        0.6,
        re.compile(
            r"\b(?:reveal|print|show|repeat|output|leak|tell me|write out|display)\b[^.\n]{0,30}?"
            r"\b(?:system prompt|hidden (?:prompt|instructions)|initial (?:prompt|instructions)"
            r"|(?:your|the) (?:original |secret )?instructions)\b",
            _I,
        ),
    ),
    (
        "role_play",
        0.6,
        re.compile(
            r"\b(?:developer mode|jailbreak(?:ed)?|do anything now|DAN mode|god mode)\b"
            r"|\b(?:act|behave|respond|roleplay|role-play) as (?:an? |the )?"
            r"(?:unrestricted|unfiltered|uncensored|jailbroken|evil|unaligned|DAN)\b"
            r"|\bpretend (?:to be|you are|that you are) (?:an? )?"
            r"(?:unrestricted|unfiltered|uncensored|jailbroken|evil|different) ",
            _I,
        ),
    ),
    ("persona_switch", 0.3, re.compile(r"\b(?:you are now|from now on,? you (?:are|will))\b", _I)),
    (
        "no_limits",
        0.35,
        re.compile(
            r"\b(?:no|without (?:any )?)(?:restrictions|limitations|filters|censorship"
            r"|content policy|ethical guidelines)\b|\b(?:unfiltered|uncensored)\b",
            _I,
        ),
    ),
    (
        "fake_role_tag",
        0.5,
        re.compile(
            r"<\|im_start\|>|<\|(?:system|assistant)\|>|\[/?INST\]|<</?SYS>>"
            r"|^\s*#{2,}\s*(?:system|instruction)s?\b|^\s*system\s*:",
            _I,
        ),
    ),
]

# Zero-width and invisible format characters, and the bidirectional overrides of "Trojan
# Source". U+200D (joiner) and U+FE0F (emoji presentation) are left out: emoji use them.
_INVISIBLE = re.compile("[\u200b\u200c\u200e\u200f\u2060-\u2064\u206a-\u206f\ufeff\u00ad]")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
# Unicode tag characters mirror ASCII (U+E0020-U+E007E) and render as nothing. Subdivision
# flags (England: U+1F3F4 then tags, ended by U+E007F) are the one legitimate use.
_TAGS = re.compile("[\U000e0000-\U000e007f]+")
_FLAG_TAGS = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}){12,}(?![0-9A-Fa-f])")

_WEIGHTS = {
    "hidden_text": 0.45,
    "hidden_instructions": 0.85,
    "bidi_override": 0.4,
    "encoded_instructions": 0.85,
}


def _markers(text: str) -> set[str]:
    return {name for name, _, pattern in _MARKERS if pattern.search(text)}


def _printable(raw: bytes) -> str | None:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not decoded or sum(ch.isprintable() or ch.isspace() for ch in decoded) < 0.95 * len(decoded):
        return None
    return decoded


def _decoded_payloads(text: str) -> list[str]:
    payloads = []
    for m in _BASE64.finditer(text):
        chunk = m.group()
        # Plain long words and identifiers match the alphabet too; real base64 of text mixes
        # cases and has a length that decodes.
        if chunk.isalpha() and (chunk.islower() or chunk.isupper()):
            continue
        padded = chunk + "=" * (-len(chunk) % 4)
        try:
            decoded = _printable(base64.b64decode(padded, validate=True))
        except (binascii.Error, ValueError):
            continue
        if decoded:
            payloads.append(decoded)
    for m in _HEX.finditer(text):
        decoded = _printable(bytes.fromhex(m.group()))
        if decoded:
            payloads.append(decoded)
    return payloads


def _signals(text: str) -> set[str]:
    signals = _markers(text)
    without_flags = _FLAG_TAGS.sub("", text)
    tags = _TAGS.findall(without_flags)
    invisible = _INVISIBLE.search(text)
    if tags or invisible:
        signals.add("hidden_text")
        smuggled = "".join(
            chr(ord(ch) - 0xE0000) for run in tags for ch in run if 0xE0020 <= ord(ch) <= 0xE007E
        )
        # Markers split by zero-width characters ("ig\u200bnore") or spelled in tag characters.
        revealed = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
        if _markers(smuggled) or (_markers(revealed) - signals):
            signals.add("hidden_instructions")
    if _BIDI.search(text):
        signals.add("bidi_override")
    if any(_markers(payload) for payload in _decoded_payloads(text)):
        signals.add("encoded_instructions")
    return signals


def injection_score(text: str) -> tuple[float, set[str]]:
    """The score in [0, 1] and the signals behind it."""
    signals = _signals(text)
    weights = {name: weight for name, weight, _ in _MARKERS} | _WEIGHTS
    score = 1 - math.prod(1 - weights[s] for s in signals)
    return round(score, 3), signals


_LABELS = {
    "override": "instruction override",
    "new_instructions": "injected instructions",
    "prompt_leak": "system prompt extraction",
    "role_play": "jailbreak role-play",
    "persona_switch": "persona switch",
    "no_limits": "request to drop restrictions",
    "fake_role_tag": "forged role markers",
    "hidden_text": "invisible characters",
    "hidden_instructions": "hidden instructions",
    "bidi_override": "bidirectional text overrides",
    "encoded_instructions": "encoded instructions",
}


class InjectionFilter:
    """Trips when the score reaches `threshold`; one finding per signal, each with the score."""

    name = NAME
    can_redact = False

    def __init__(self, *, threshold: float = 0.5):
        self.threshold = threshold

    def scan(self, text: str) -> Sequence[Finding]:
        score, signals = injection_score(text)
        if score < self.threshold:
            return []
        return [
            Finding(filter=NAME, kind=signal, start=0, end=len(text), score=score)
            for signal in sorted(signals)
        ]

    def describe(self, findings: Sequence[Finding]) -> str:
        score = max(f.score for f in findings)
        labels = ", ".join(_LABELS[f.kind] for f in findings)
        return f"it looks like a prompt injection (score {score:.2f}: {labels})"
