"""Tokenizers. ``CharTokenizer`` is the randomwalks task's own vocabulary (one token per graph
node plus specials); subword tokenizers for real models plug in behind the same interface."""
from __future__ import annotations

from typing import Dict, List, Sequence


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
