"""Whether two questions that embed close together still ask different things.

all-MiniLM-L6-v2 puts "How do I enable X?" and "How do I disable X?", or "the capital of France"
and "the capital of Spain", almost as close as two wordings of one question, so a semantic
cache hit also has to pass this word-level check. Two questions differ when:
- one has a polarity word (enable/disable, add/remove, not, ...) or a number the other lacks;
- a content word of one (after dropping function and question-framing words, and possessive
  endings) has no counterpart in the other: the same word up to its ending ("reimbursed",
  "reimbursement"), or a word close to it in the embedding model's own word-piece table
  (cosine >= WORD_PIECE_MATCH: "fridge"/"refrigerator", "bought"/"purchased"). Related words
  across a negating prefix ("pin"/"unpin", "freeze"/"unfreeze") never count as counterparts;
- both use a direction word (to, from, into, ...) and their shared content words come in a
  different order ("convert a PDF to Word" / "convert Word to a PDF").

The word-piece table gives "Saturday"/"Sunday" 0.63 and "France"/"Spain" 0.47, but also
"change"/"update" 0.33: synonyms and neighbours in a category are not told apart, so many real
paraphrases miss. Measured on bench/data/semantic_cache_pairs*.jsonl by bench/semantic_cache.py.
"""

import re
import threading
from functools import lru_cache
from typing import Any

WORD_PIECE_MATCH = 0.65

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_POLAR = frozenset(
    """
    enable disable enabled disabled on off add remove added removed delete deleted create
    allow deny allowed denied block unblock blocked increase decrease raise lower more less
    start stop started stopped open close lock unlock install uninstall import export upload
    download encrypt decrypt subscribe unsubscribe include exclude with without before after
    max min maximum minimum first last most least up down out join leave show hide
    accept reject approve connect disconnect mute unmute buy sell give take send receive
    not no never cannot can't don't doesn't isn't aren't won't wasn't weren't shouldn't
    couldn't wouldn't didn't hasn't haven't nor none
    """.split()
)
# Function words and the words people wrap a question in ("can you explain", "tell me").
_FRAMING = (
    frozenset(
        """
        a an the i me my mine you your we our us it its this that these those is are was were
        be been being am do does did doing done have has had having can could would should will
        shall may might must how what whats what's when where which who whom whose why there
        there's here to of in at for from by about into onto and or but if so as than then
        please tell know want wanted need like i'd i'm you're it's way ways anyone someone
        something any some just also really very best good get got go going make made use using
        used explain describe steps step process walk through mean means meaning ok okay hi
        hello thanks thank kindly quick quickly simple simply exactly actually
        """.split()
    )
    - _POLAR
)
_DIRECTION = frozenset({"to", "from", "into", "than", "vs", "versus"})
_NEGATING_PREFIXES = ("un", "dis", "de", "in", "im", "non", "anti")

_load_lock = threading.Lock()
_table: dict[str, Any] = {}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _content(words: list[str]) -> list[str]:
    return [w.removesuffix("'s") for w in words if w not in _FRAMING]


def _same_word(a: str, b: str) -> bool:
    """The same word up to its ending."""
    if a == b:
        return True
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    # "reimbursed"/"reimbursement" share a long stem; "interest"/"internet" only "inter".
    return shared >= max(5, 0.7 * min(len(a), len(b)))


def _word_piece_table() -> tuple[Any, Any]:
    """The embedding model's tokenizer and its input word-piece vectors, L2-normalised."""
    with _load_lock:
        if not _table:
            import numpy as np
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer

            from models_admin.embeddings import embedding_model_dir

            directory = embedding_model_dir()
            tensors = load_file(str(directory / "model.safetensors"))
            key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
            matrix = tensors[key].astype(np.float32)
            matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            # The file pads every text to 128 pieces; a padded word would average to [PAD].
            tokenizer.no_padding()
            tokenizer.no_truncation()
            _table["tokenizer"] = tokenizer
            _table["matrix"] = matrix
    return _table["tokenizer"], _table["matrix"]


@lru_cache(maxsize=4096)
def _word_vector(word: str) -> Any:
    import numpy as np

    tokenizer, matrix = _word_piece_table()
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    vector = matrix[ids].mean(axis=0)
    return vector / np.linalg.norm(vector)


def _negated(a: str, b: str) -> bool:
    return any(a == prefix + b or b == prefix + a for prefix in _NEGATING_PREFIXES)


def _counterpart(a: str, b: str) -> bool:
    if _negated(a, b):
        return False
    return _same_word(a, b) or float(_word_vector(a) @ _word_vector(b)) >= WORD_PIECE_MATCH


def polarity_or_number_differs(a: str, b: str) -> bool:
    """The first test alone: a polarity word or a number that one question has and the other
    lacks (the whole guard before the word-level tests were added; the bench compares both)."""
    changed = set(_words(a)) ^ set(_words(b))
    return bool(changed & _POLAR) or any(any(ch.isdigit() for ch in w) for w in changed)


def meaning_differs(a: str, b: str) -> bool:
    """Whether two questions ask different things despite looking alike (see the module)."""
    if polarity_or_number_differs(a, b):
        return True
    words_a, words_b = _words(a), _words(b)
    content_a, content_b = _content(words_a), _content(words_b)
    only_a = [w for w in dict.fromkeys(content_a) if w not in content_b]
    only_b = [w for w in dict.fromkeys(content_b) if w not in content_a]
    for mine, theirs in ((only_a, only_b), (only_b, only_a)):
        for word in mine:
            if not any(_counterpart(word, other) for other in theirs):
                return True
    if set(words_a) & set(words_b) & _DIRECTION:
        order_a = [w for w in content_a if w in content_b]
        order_b = [w for w in content_b if w in content_a]
        if order_a != order_b:
            return True
    return False
