"""Overlapping chunks counted in the embedding model's own tokens."""

from dataclasses import dataclass

from models_admin.embeddings import embedding_tokenizer, embedding_tokenizer_lock


@dataclass(frozen=True)
class TextChunk:
    text: str
    start_char: int
    end_char: int
    token_count: int


def text_chunk(*, text: str, chunk_tokens: int, overlap_tokens: int) -> list[TextChunk]:
    """Windows of `chunk_tokens` tokens, each starting `chunk_tokens - overlap_tokens` after the
    previous one; the text of a window is the original text between its first and last token."""
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError("overlap must be smaller than the chunk size")
    tokenizer = embedding_tokenizer()
    with embedding_tokenizer_lock():
        encoded = tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=False,
            verbose=False,
        )
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    step = chunk_tokens - overlap_tokens
    chunks: list[TextChunk] = []
    for start in range(0, len(offsets), step):
        window = offsets[start : start + chunk_tokens]
        begin, end = window[0][0], window[-1][1]
        chunks.append(
            TextChunk(text=text[begin:end], start_char=begin, end_char=end, token_count=len(window))
        )
        if start + chunk_tokens >= len(offsets):
            break
    return chunks
