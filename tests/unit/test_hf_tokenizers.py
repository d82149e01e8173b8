"""Checkpoint tokenizers: tokenizer.json (``tokenizers``), SentencePiece tokenizer.model, and the
randomwalks character vocabulary written as tokenizer.json. All trained or built here, no downloads."""
import json

import pytest

from nemo_rlhf.data.tokenizers import (CharTokenizer, HFTokenizer, SentencePieceTokenizer, TokenizerError,
                                       load_tokenizer, tokenizer_for)

TEXT = ["the quick brown fox jumps over the lazy dog", "a b c d e f g", "graph walks reach the goal node",
        "we train small models on small data", "tokenizers split text into pieces"] * 20


def train_bpe(vocab_size: int = 120):
    """A tiny BPE (Metaspace pre-tokenizer, so decode(encode(s)) == s) with <pad>=0, <eos>=1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"]))
    return tok


def test_hf_tokenizer_json_matches_transformers(tmp_path):
    import transformers
    train_bpe().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ("the lazy fox", "graph walks", "unseen zebra words"):
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids + [ours.eos_id, ours.pad_id]) == text
    assert (ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 0, len(theirs))
    assert ours.convert_ids_to_tokens(ours.encode("the")) == theirs.convert_ids_to_tokens(theirs("the")["input_ids"])


def test_pad_falls_back_to_eos_and_a_missing_eos_is_named(tmp_path):
    train_bpe().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 1 and tok.pad_id == 0          # "<pad>" found by name
    from tokenizers import Tokenizer, models

    bare = tmp_path / "bare"
    bare.mkdir()
    Tokenizer(models.WordLevel({"x": 0, "y": 1}, unk_token="x")).save(str(bare / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no EOS token"):
        load_tokenizer(bare)
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "nowhere")


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=60, model_type="unigram", hard_vocab_limit=False,
                                   pad_id=3, minloglevel=2)
    tok = load_tokenizer(tmp_path)                     # only tokenizer.model there
    assert isinstance(tok, SentencePieceTokenizer)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "the quick graph walks"
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text) + [tok.eos_id]) == text
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (2, 3, 1, ref.get_piece_size())
    # tokenizer.json wins when both are there (HF directories of Llama 2 carry both)
    train_bpe().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "tokenizer.model")


def test_char_tokenizer_saved_as_tokenizer_json_keeps_its_ids(tmp_path):
    import transformers
    char = CharTokenizer(list("abcdef"))
    char.save_hf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    walk = "bdca"
    again = tokenizer_for(tmp_path, list("abcdef"))    # model.path with a tokenizer: the checkpoint's
    assert isinstance(again, HFTokenizer)
    assert again.encode(walk) == char.encode(walk) and again.ids["c"] == char.ids["c"]
    assert (again.eos_id, again.pad_id, again.vocab_size) == (char.eos_id, char.pad_id, char.vocab_size)
    assert again.decode(char.encode(walk) + [1, 0]) == walk
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(walk, add_special_tokens=False)["input_ids"] == char.encode(walk)
    assert auto.decode(char.encode(walk)) == walk
    with pytest.raises(TokenizerError, match=r"symbols \['x'\]"):
        tokenizer_for(tmp_path, list("abx"))
    assert isinstance(tokenizer_for(None, list("ab")), CharTokenizer)
