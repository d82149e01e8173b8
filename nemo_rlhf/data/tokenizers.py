"""Tokenizers behind one interface (``encode``, ``decode``, ``convert_ids_to_tokens``, ``ids``,
``vocab_size``, ``eos_id``, ``pad_id``): ``CharTokenizer`` is the randomwalks task's own vocabulary
(one token per graph node plus specials); ``HFTokenizer`` (tokenizer.json through the
``tokenizers`` library) and ``SentencePieceTokenizer`` (tokenizer.model, or T5's spiece.model) are a
checkpoint's,
chosen from its directory by :func:`load_tokenizer`."""
from __future__ import annotations

from typing import Dict, List, Sequence

from nemo_rlhf.config.schema import ConfigError
from nemo_rlhf.logging import get_logger

log = get_logger(__name__)


class CharTokenizer:
    """One token per symbol. Ids: 0 = <pad>, 1 = <eos>, then the symbols in order."""

    pad_token, eos_token = "<pad>", "<eos>"

    def __init__(self, symbols: Sequence[str]):
        if len(set(symbols)) != len(symbols) or any(len(s) != 1 for s in symbols):
            raise ValueError(f"CharTokenizer needs distinct single-character symbols, got {list(symbols)}")
        self.tokens: List[str] = [self.pad_token, self.eos_token, *symbols]
        self.ids: Dict[str, int] = {t: i for i, t in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    def encode(self, text: str) -> List[int]:
        try:
            return [self.ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.tokens[i] if 0 <= i < len(self.tokens) else f"<unk:{i}>" for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        toks = self.convert_ids_to_tokens(ids)
        if skip_special_tokens:
            toks = [t for t in toks if t not in (self.pad_token, self.eos_token)]
        return "".join(toks)

    def save_hf(self, directory) -> None:
        """Write this vocabulary as a Hugging Face fast tokenizer (tokenizer.json: one WordLevel
        token per character, fused back on decode) that ``AutoTokenizer`` and :func:`load_tokenizer`
        load with the same ids."""
        import json
        from pathlib import Path

        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel(vocab=dict(self.ids), unk_token=self.pad_token))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([self.pad_token, self.eos_token])
        directory = Path(directory)
        tok.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token, "pad_token": self.pad_token,
            "model_max_length": 1 << 30}, indent=2) + "\n")


class _TextIds(dict):
    """token text -> id, looked up the way ``encode`` would tokenize the text when that gives one
    token (SentencePiece encodes "a" as "\u2581a", not as the piece "a"); the vocabulary otherwise."""

    def __init__(self, vocab, encode):
        super().__init__(vocab)
        self._encode = encode

    def __getitem__(self, text):
        ids = self._encode(text)
        return ids[0] if len(ids) == 1 else dict.__getitem__(self, text)


from nemo_rlhf.errors import TokenizerError  # noqa: F401  (re-exported)


def _special(directory, name: str):
    """A special token's text from tokenizer_config.json / special_tokens_map.json (str or AddedToken dict)."""
    import json
    from pathlib import Path

    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        p = Path(directory) / f
        if p.is_file():
            value = json.loads(p.read_text()).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


def _config_id(directory, name: str):
    import json
    from pathlib import Path

    p = Path(directory) / "config.json"
    value = json.loads(p.read_text()).get(name) if p.is_file() else None
    return value[0] if isinstance(value, list) and value else value


class _SpecialIds:
    """``vocab_size`` / ``pad_id`` / ``eos_id`` of the checkpoint tokenizers, from ``tokens``,
    ``_pad`` and ``_eos`` set by their constructors."""

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eos_id(self) -> int:
        return self._eos


class HFTokenizer(_SpecialIds):
    """A Hugging Face fast tokenizer (``tokenizer.json``, or GPT-2's vocab.json + merges.txt)
    through the ``tokenizers`` library, behind the interface of :class:`CharTokenizer`.
    ``encode`` adds no special tokens (prompts and completions are encoded separately and
    joined); EOS/PAD/BOS come from tokenizer_config.json / special_tokens_map.json, then
    config.json's ids; PAD falls back to EOS (GPT-2, Llama have none)."""

    def __init__(self, directory):
        from pathlib import Path

        from tokenizers import Tokenizer

        d = Path(directory)
        self.directory = d
        if (d / "tokenizer.json").is_file():
            try:
                self._tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # the library raises a bare Exception on malformed JSON
                raise TokenizerError(f"{d / 'tokenizer.json'}: cannot load ({e})") from None
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            from tokenizers import decoders, models, pre_tokenizers

            self._tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
            self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self._tok.decoder = decoders.ByteLevel()
        else:
            raise TokenizerError(f"{d}: no tokenizer.json (or vocab.json + merges.txt)")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.ids = _TextIds(vocab, self.encode)
        self.tokens = [None] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            self.tokens[i] = t

        def find(name, config_key, fallbacks=()):
            text = _special(d, name)
            if text is not None and text in vocab:
                return vocab[text]
            cid = _config_id(d, config_key)
            if cid is not None:
                return int(cid)
            return next((vocab[t] for t in fallbacks if t in vocab), None)

        self._eos = find("eos_token", "eos_token_id", ("<|endoftext|>", "</s>", "<eos>", "<|eos|>"))
        if self._eos is None:
            raise TokenizerError(f"{d}: no EOS token (set eos_token in tokenizer_config.json)")
        pad = find("pad_token", "pad_token_id", ("<pad>",))
        self._pad = self._eos if pad is None else pad
        self.bos_id = find("bos_token", "bos_token_id", ())
        self._specials = {i for i in (self._eos, self._pad, self.bos_id) if i is not None}

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self._tok.id_to_token(int(i)) or f"<unk:{i}>" for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self._specials)]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(_SpecialIds):
    """A SentencePiece model (``tokenizer.model``: Llama 1/2, Mistral, T5) behind the interface of
    :class:`CharTokenizer`. ``encode`` adds no BOS/EOS; PAD falls back to EOS when the model has none."""

    def __init__(self, model_file):
        from pathlib import Path

        import sentencepiece as spm

        self.path = Path(model_file)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such SentencePiece model")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None
        n = self._sp.get_piece_size()
        self.tokens = [self._sp.id_to_piece(i) for i in range(n)]
        self.ids = _TextIds({t: i for i, t in enumerate(self.tokens)}, self.encode)
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{self.path}: the SentencePiece model has no EOS piece")
        self._eos = self._sp.eos_id()
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._eos
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> List[int]:
        return list(self._sp.encode(text))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.tokens[i] if 0 <= i < len(self.tokens) else f"<unk:{i}>" for i in map(int, ids)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < len(self.tokens)]
        if skip_special_tokens:
            ids = [i for i in ids if not self._sp.is_control(i)]
        return self._sp.decode(ids)


SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model")
"""SentencePiece model file names in checkpoint directories: Llama / Mistral's, then T5's."""


def load_tokenizer(directory):
    """The tokenizer of a checkpoint directory: tokenizer.json (HF fast) first, then a
    SentencePiece tokenizer.model / spiece.model (T5), then GPT-2's vocab.json + merges.txt."""
    from pathlib import Path

    d = Path(directory)
    if (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        return HFTokenizer(d)
    for name in SENTENCEPIECE_FILES:
        if (d / name).is_file():
            return SentencePieceTokenizer(d / name)
    raise TokenizerError(f"{d}: no tokenizer files (tokenizer.json, tokenizer.model, spiece.model, or "
                         f"vocab.json + merges.txt)")


def has_tokenizer(directory) -> bool:
    from pathlib import Path

    d = Path(directory)
    return any((d / f).is_file() for f in ("tokenizer.json", *SENTENCEPIECE_FILES, "vocab.json"))


def tokenizer_for(model_path, symbols: Sequence[str]):
    """The run's tokenizer: the checkpoint's when ``model_path`` is a Hugging Face directory or a
    converted checkpoint (scripts/convert_checkpoint.py) with tokenizer files, else the task's
    :class:`CharTokenizer`, for decoder-only and T5 (model.arch=t5) checkpoints alike. A checkpoint
    tokenizer must encode each task symbol as one token, and a walk as its symbols' tokens in order
    (the randomwalks task scores token by token; a SentencePiece model that adds a "\u2581" word
    prefix or merges symbols fails this)."""
    from pathlib import Path

    ckpt = model_path is not None and any((Path(model_path) / f).is_file()
                                          for f in ("config.json", "nemo_rlhf_meta.json"))
    if not ckpt or not has_tokenizer(model_path):
        return CharTokenizer(symbols)
    tok = load_tokenizer(model_path)
    bad = [s for s in symbols if len(tok.encode(s)) != 1 or tok.decode(tok.encode(s)) != s]
    if bad:
        raise TokenizerError(f"the tokenizer of {model_path} does not encode the task's symbols {bad[:10]} as "
                             f"single tokens; the randomwalks task needs one token per node")
    walk = "".join(symbols)
    if tok.encode(walk) != [i for s in symbols for i in tok.encode(s)]:
        raise TokenizerError(f"the tokenizer of {model_path} encodes the walk {walk!r} differently from its "
                             f"symbols one by one (merges or word prefixes); the randomwalks task needs one "
                             f"token per node")
    log.info("tokenizer: %s from %s (vocabulary %d, eos %d, pad %d)", type(tok).__name__,
             getattr(tok, "path", model_path), tok.vocab_size, tok.eos_id, tok.pad_id)
    return tok
