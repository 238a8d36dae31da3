"""What text can be stored: PostgreSQL's text type holds no NUL character, and UTF-8 has no
unpaired surrogates (JSON can carry both). Chat messages and /v1 requests are checked here
before anything is saved."""


def text_unstorable_reason(text: str) -> str | None:
    """Why `text` cannot be stored, or None when it can."""
    if "\x00" in text:
        return "contains the NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it has an unpaired surrogate)"
    return None
