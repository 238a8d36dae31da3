"""From uploaded bytes to clean text, one reader per document type."""

import io
import re
import unicodedata
from pathlib import PurePath

from bs4 import BeautifulSoup

SUPPORTED_TYPES = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}


class DocumentRejected(Exception):
    """The document cannot be ingested; the message says why, for the operator."""


def document_type_of(filename: str) -> str:
    """The document type for a file name, or DocumentRejected for an unsupported one."""
    suffix = PurePath(filename).suffix.lower()
    kind = SUPPORTED_TYPES.get(suffix)
    if kind is None:
        shown = suffix or "(no extension)"
        raise DocumentRejected(
            f"Unsupported file type {shown}: upload plain text, Markdown, HTML or PDF."
        )
    return kind


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentRejected(
            f"The file is not UTF-8 text (undecodable byte at position {exc.start})."
        ) from exc


def _html_text(data: bytes) -> str:
    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    return soup.get_text("\n")


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentRejected("The PDF is encrypted; upload an unprotected copy.")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except DocumentRejected:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentRejected(f"The PDF could not be read ({exc}).") from exc


_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def text_clean(text: str) -> str:
    """Normalised Unicode, no control characters (PostgreSQL text holds no NUL), single spaces,
    at most one blank line between paragraphs."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def document_parse(*, filename: str, data: bytes) -> str:
    """The clean text of a document; DocumentRejected when there is none to be had."""
    kind = document_type_of(filename)
    if kind == "pdf":
        raw = _pdf_text(data)
    elif kind == "html":
        raw = _html_text(data)
    else:
        raw = _decode(data)
    text = text_clean(raw)
    if not text:
        raise DocumentRejected("The document contains no text.")
    return text
