"""Personal data: email, phone, payment card, IBAN, national ids (US SSN, UK NINO, Spanish DNI)
and IP addresses.

Regular expressions only propose candidates; each is then checked the way its issuer defines it
(Luhn for cards, mod-97 for IBANs, the SSA's rules for SSNs, the DNI check letter), with
python-stdnum and phonenumbers rather than home-made checksums. That check is what keeps order
numbers, failed card numbers and version strings out.
"""

import ipaddress
import re
from collections.abc import Callable, Sequence

import phonenumbers
from stdnum import iban, luhn
from stdnum.es import dni
from stdnum.us import ssn

from governance.safety.base import Finding

NAME = "pii"

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "iban": "[IBAN]",
    "ssn": "[NATIONAL_ID]",
    "nino": "[NATIONAL_ID]",
    "dni": "[NATIONAL_ID]",
    "ip": "[IP]",
}
_LABELS = {
    "email": "an email address",
    "phone": "a phone number",
    "card": "a payment card number",
    "iban": "a bank account number (IBAN)",
    "ssn": "a national id number",
    "nino": "a national id number",
    "dni": "a national id number",
    "ip": "an IP address",
}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.([A-Za-z]{2,24})\b"
)
# Retina image names (icon@2x.png) have the shape of an address.
_FILE_SUFFIXES = {"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "tiff"}
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,32}\b")
_SSN = re.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])")
# HMRC's rules: no D, F, I, Q, U, V in either prefix letter, no O second, some pairs never issued.
_NINO = re.compile(
    r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
)
_DNI = re.compile(r"(?<![\w-])\d{8}-?[A-Z]\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:|:){2,7}(?::|[0-9A-Fa-f]{1,4})(?![\w:])")
# "v1.2.3.4", "version 10.0.0.1", "build 4.1.0.12": dotted quads that are releases, not hosts.
_VERSION_BEFORE = re.compile(
    r"(?:\bv|\b(?:version|release|build|ver|firmware|driver)s?\W{0,3})$", re.I
)


def _emails(text: str) -> list[tuple[str, int, int]]:
    return [
        ("email", m.start(), m.end())
        for m in _EMAIL.finditer(text)
        if m.group(1).lower() not in _FILE_SUFFIXES
    ]


def _card_prefix_plausible(digits: str) -> bool:
    # Issuer ranges (Visa 4, Mastercard 51-55 and 2221-2720, Amex 34/37, Discover/UnionPay 6,
    # Diners 30/36/38, JCB 35); a Luhn-valid number outside them is most likely something else.
    if digits[0] in "456":
        return True
    if digits[0] == "3":
        return digits[1] in "04678" or digits[:2] == "35"
    return digits[0] == "2" and 2221 <= int(digits[:4]) <= 2720


def _cards(text: str) -> list[tuple[str, int, int]]:
    found = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _card_prefix_plausible(digits) and luhn.is_valid(digits):
            found.append(("card", m.start(), m.end()))
    return found


def _ibans(text: str) -> list[tuple[str, int, int]]:
    found = []
    for m in _IBAN.finditer(text):
        candidate = m.group()
        # The pattern may run on into a following code or word; try the longest valid prefix
        # that ends at a group boundary.
        ends = [len(candidate)] + [
            i for i in range(len(candidate) - 1, 14, -1) if candidate[i] == " "
        ]
        for end in ends:
            if iban.is_valid(candidate[:end]):
                found.append(("iban", m.start(), m.start() + end))
                break
    return found


def _ssns(text: str) -> list[tuple[str, int, int]]:
    return [
        ("ssn", m.start(), m.end())
        for m in _SSN.finditer(text)
        if ssn.is_valid(m.group(1) + m.group(3) + m.group(4))
    ]


def _ninos(text: str) -> list[tuple[str, int, int]]:
    return [("nino", m.start(), m.end()) for m in _NINO.finditer(text)]


def _dnis(text: str) -> list[tuple[str, int, int]]:
    return [("dni", m.start(), m.end()) for m in _DNI.finditer(text) if dni.is_valid(m.group())]


def _ips(text: str) -> list[tuple[str, int, int]]:
    found = []
    for m in _IPV4.finditer(text):
        if _VERSION_BEFORE.search(text[max(0, m.start() - 12) : m.start()]):
            continue
        try:
            ipaddress.IPv4Address(m.group())  # rejects octets over 255 and leading zeros
        except ValueError:
            continue
        found.append(("ip", m.start(), m.end()))
    for m in _IPV6.finditer(text):
        candidate = m.group()
        if candidate.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", candidate):
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        found.append(("ip", m.start(), m.end()))
    return found


class PiiFilter:
    """Finds personal data; redaction puts a typed placeholder in its place (`[EMAIL]`)."""

    name = NAME
    can_redact = True

    def __init__(self, *, phone_region: str = "US"):
        self.phone_region = phone_region
        # Checked in this order; a span already claimed (an IBAN's digits) is not a phone.
        self._detectors: list[Callable[[str], list[tuple[str, int, int]]]] = [
            _emails,
            _ibans,
            _cards,
            _ssns,
            _ninos,
            _dnis,
            _ips,
            self._phones,
        ]

    def _phones(self, text: str) -> list[tuple[str, int, int]]:
        matcher = phonenumbers.PhoneNumberMatcher(
            text, self.phone_region, leniency=phonenumbers.Leniency.VALID
        )
        return [("phone", m.start, m.end) for m in matcher]

    def scan(self, text: str) -> Sequence[Finding]:
        taken: list[tuple[int, int]] = []
        findings = []
        for detect in self._detectors:
            for kind, start, end in detect(text):
                if any(start < e and s < end for s, e in taken):
                    continue
                taken.append((start, end))
                findings.append(
                    Finding(
                        filter=NAME,
                        kind=kind,
                        start=start,
                        end=end,
                        placeholder=PLACEHOLDERS[kind],
                    )
                )
        return sorted(findings, key=lambda f: f.start)

    def describe(self, findings: Sequence[Finding]) -> str:
        kinds = sorted({_LABELS[f.kind] for f in findings})
        return "the text contains " + ", ".join(kinds)
