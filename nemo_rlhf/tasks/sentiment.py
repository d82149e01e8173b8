"""The sentiment task: real English text (the King James Bible, nemo_rlhf/tasks/text_corpus.py),
a BPE tokenizer trained on it, and VADER's lexicon-based sentiment as the reward — the analogue of
trlX's ``ppo_sentiments`` that runs on a CPU with nothing downloaded at run time.

Data (all a pure function of the config):
  - whole books are held out (``heldout_fraction``, chosen by ``seed``); the rest is training text;
  - ``sft_samples``: training verses of at most ``max_passage_tokens`` tokens (EOS included), cut
    into (first ``prompt_words`` words, the rest) — the SFT warm-up is plain language modelling;
  - ``prompts``: the first ``prompt_words`` words of training verses (RL prompts);
  - evaluation: ``num_eval`` prompts and ``num_eval_passages`` verses from the held-out books;
  - ``preference_pairs`` (DPO): a passage of ``summary_verses`` consecutive training verses as the
    prompt, its first sentence as the chosen summary and the first sentence of another passage of
    about the same length as the rejected one (fluent text of the same style that says something
    else); ``num_eval_pairs``
    pairs built the same way from the held-out books are evaluated.

Reward (``reward_fn``): VADER's compound score in [-1, 1] of the completion (of the whole sample
when the caller gives no completions). Metrics (``evaluate``): ``sentiment`` (mean reward of
temperature samples from the held-out prompts), ``perplexity`` (exp of the mean NLL per token of
the held-out verses' continuations after their prompt words) and, with held-out pairs,
``pref_accuracy`` (share of pairs whose chosen summary has the higher log-probability under the
policy) and ``pref_margin`` (mean log p(chosen) - log p(rejected)).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nemo_rlhf.tasks.text_corpus import first_sentence, first_words, read_verses, split_books, train_tokenizer


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment of ``text`` in [-1, 1] (0 for empty text)."""
    return float(_analyzer().polarity_scores(text)["compound"]) if text.strip() else 0.0


def vader_reward(samples: Sequence[str], prompts=None, completions=None, **_) -> List[float]:
    """A reward function for ``ppo.reward_fn=nemo_rlhf.tasks.sentiment:vader_reward``: VADER's
    compound score of each completion (of each sample when no completions are given)."""
    texts = completions if completions is not None else samples
    return [vader_compound(t) for t in texts]


class Sentiment:
    """Corpus splits, tokenizer, reward and evaluation of the sentiment task."""

    name = "sentiment"

    def __init__(self, corpus: str = "kjv", vocab_size: int = 2000, prompt_words: int = 4, max_length: int = 24,
                 max_passage_tokens: int = 48, heldout_fraction: float = 0.1, num_eval: int = 128,
                 num_eval_passages: int = 256, num_eval_pairs: int = 0, summary_verses: int = 3, context_verses: int = 0, seed: int = 1000):
        if prompt_words < 1:
            raise ValueError(f"task.prompt_words must be >= 1, got {prompt_words}")
        if summary_verses < 2:
            raise ValueError(f"task.summary_verses must be >= 2 (a passage longer than its summary), got {summary_verses}")
        self.corpus, self.prompt_words, self.max_length, self.seed = corpus, prompt_words, max_length, seed
        self.max_passage_tokens, self.summary_verses = max_passage_tokens, summary_verses
        self.context_verses = context_verses
        verses = read_verses(corpus)
        self.train_books, self.heldout_books = split_books(verses, heldout_fraction, seed)
        held = set(self.heldout_books)
        self.train_verses = [v for v in verses if v.book not in held]
        self.heldout_verses = [v for v in verses if v.book in held]
        self.tokenizer_ = train_tokenizer([v.text for v in self.train_verses], vocab_size,
                                          {"corpus": corpus, "heldout_books": self.heldout_books})
        tok = self.tokenizer_
        n_tokens = lambda text: len(tok.encode(text)) + 1      # + EOS
        self.max_prompt_tokens = 4 * prompt_words
        fits = lambda v: n_tokens(v.text) <= max_passage_tokens and len(v.text.split(" ")) > prompt_words \
            and len(tok.encode(first_words(v.text, prompt_words)[0])) <= self.max_prompt_tokens
        self.sft_texts = [v.text for v in self.train_verses if fits(v)]
        seen = {v.text for v in self.train_verses}      # a verse some training book repeats word for word stays out
        heldout_texts = [v.text for v in self.heldout_verses if fits(v) and v.text not in seen]
        if not self.sft_texts or not heldout_texts:
            raise ValueError(f"no verse fits task.max_passage_tokens={max_passage_tokens} with "
                             f"task.prompt_words={prompt_words}: raise max_passage_tokens")
        rng = np.random.RandomState(seed)
        pick = lambda items, n: [items[i] for i in sorted(rng.permutation(len(items))[:min(n, len(items))])]
        self.eval_texts = pick(heldout_texts, num_eval)
        self.eval_passages = pick(heldout_texts, num_eval_passages)
        self.eval_pairs = pick(self.text_pairs(self.heldout_verses, seed + 1), num_eval_pairs) if num_eval_pairs else []
        self.shown: List[List[Tuple[str, str, float]]] = []
        """(prompt, completion, reward) of the first held-out prompts' first samples, one list per evaluation."""

    # -- what the runner and recipes read -------------------------------------------------------
    @property
    def vocab(self) -> List[str]:
        return []

    def tokenizer(self):
        """The task's own tokenizer (BPE trained on the training books), which the runner uses."""
        return self.tokenizer_

    def split(self, text: str) -> Tuple[str, str]:
        return first_words(text, self.prompt_words)

    def sft_samples(self) -> List[List[str]]:
        """[first words, rest] of every training verse that fits max_passage_tokens; with
        ``context_verses`` the verses before it in its chapter come first in the prompt (an
        encoder-decoder then reads passages as long as the DPO prompts during its warm-up)."""
        if not self.context_verses:
            return [list(self.split(t)) for t in self.sft_texts]
        out, tok = [], self.tokenizer_
        for i, v in enumerate(self.train_verses):
            context = [c.text for c in self.train_verses[max(0, i - self.context_verses):i]
                       if (c.book, c.chapter) == (v.book, v.chapter)]
            prompt, completion = self.split(v.text)
            prompt = " ".join(context + [prompt])
            if completion and len(tok.encode(prompt + completion)) + 1 <= self.max_passage_tokens:
                out.append([prompt, completion])
        return out

    def prompts(self) -> List[str]:
        return [self.split(t)[0] for t in self.sft_texts]

    def reward_fn(self, samples: Sequence[str], prompts=None, completions=None, **_) -> List[float]:
        """VADER's compound score of each completion (see :func:`vader_reward`)."""
        return vader_reward(samples, prompts=prompts, completions=completions)

    def text_pairs(self, verses, seed: int) -> List[Tuple[str, str, str]]:
        """(passage, its first sentence, another passage's first sentence) for every run of
        ``summary_verses`` consecutive verses of one chapter in ``verses`` that fits
        max_passage_tokens with either summary (EOS included)."""
        passages, run = [], []
        for v in verses:
            if run and (v.book, v.chapter) != (run[-1].book, run[-1].chapter):
                run = []
            run.append(v)
            if len(run) == self.summary_verses:
                passages.append(" ".join(x.text for x in run))
                run = []
        tok, out = self.tokenizer_, []
        summaries = [first_sentence(p) for p in passages]
        # the rejected summary: another passage's first sentence of about the same token length (a
        # neighbour in length order), so that length tells nothing about which one is preferred
        by_length = np.argsort([len(tok.encode(" " + s)) for s in summaries], kind="stable")
        rng, other = np.random.RandomState(seed), np.zeros(len(passages), dtype=np.int64)
        for rank, i in enumerate(by_length):
            step = int(rng.choice([-2, -1, 1, 2]))
            other[i] = by_length[min(max(rank + step, 0), len(passages) - 1)] if len(passages) > 1 else i
        for i, p in enumerate(passages):
            chosen, rejected = " " + summaries[i], " " + summaries[other[i]]
            n = len(tok.encode(p)) + 1 + max(len(tok.encode(chosen)), len(tok.encode(rejected)))
            if n <= self.max_passage_tokens and summaries[i] != summaries[other[i]]:
                out.append((p, chosen, rejected))
        return out

    def preference_pairs(self, tokenizer, num_pairs: int, seed: int) -> List[Tuple[List[int], List[int], List[int]]]:
        """(prompt, chosen + EOS, rejected + EOS) token ids of ``num_pairs`` training passages (all
        there are when fewer): the DPO recipe's data when data.train_file is null."""
        pairs = self.text_pairs(self.train_verses, seed)
        if not pairs:
            raise ValueError(f"no passage of task.summary_verses={self.summary_verses} verses fits "
                             f"task.max_passage_tokens={self.max_passage_tokens}: raise max_passage_tokens")
        order = np.random.RandomState(seed).permutation(len(pairs))[:num_pairs]
        eos = tokenizer.eos_id
        return [(tokenizer.encode(pairs[i][0]), tokenizer.encode(pairs[i][1]) + [eos],
                 tokenizer.encode(pairs[i][2]) + [eos]) for i in order]

    def evaluate(self, model, tokenizer, samples_per_start: int, seed: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, max_new_tokens=None, logits_processor=None,
                 suffix: str = "") -> Dict[str, float]:
        """Held-out sentiment of temperature samples (sharded over data-parallel ranks, the same at
        any layout), held-out perplexity and, with task.num_eval_pairs, held-out preference accuracy."""
        from nemo_rlhf.generation.sampling import SamplingParams
        from nemo_rlhf.tasks.sharded import sharded_sums

        prompts = [self.split(t)[0] for t in self.eval_texts for _ in range(samples_per_start)]
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, max_new_tokens=max_new_tokens or self.max_length)
        shown, every = {}, max(1, len(self.eval_texts) // SHOWN)

        def score(i, ids):
            text = tokenizer.decode(ids)
            reward = vader_compound(text)
            if i % samples_per_start == 0 and (i // samples_per_start) % every == 0:
                shown[i] = (prompts[i], text, reward)
            return (reward,)

        total = sharded_sums(model, [tokenizer.encode(p) for p in prompts], params, seed, score, 1,
                             tokenizer.vocab_size, logits_processor)
        metrics = {f"sentiment{suffix}": total[0] / max(total[1], 1.0)}
        self.shown.append([shown[i] for i in sorted(shown)][:SHOWN])
        pairs = [(tokenizer.encode(a), tokenizer.encode(b) + [tokenizer.eos_id])
                 for a, b in map(self.split, self.eval_passages)]
        nll, count = completion_nll(model, pairs, tokenizer.pad_id)
        metrics[f"perplexity{suffix}"] = math.exp(float(nll.sum() / count.sum()))
        if self.eval_pairs:
            enc = lambda s: tokenizer.encode(s) + [tokenizer.eos_id]
            chosen, _ = completion_nll(model, [(tokenizer.encode(p), enc(c)) for p, c, _ in self.eval_pairs],
                                       tokenizer.pad_id)
            rejected, _ = completion_nll(model, [(tokenizer.encode(p), enc(r)) for p, _, r in self.eval_pairs],
                                         tokenizer.pad_id)
            margin = rejected - chosen                  # log p(chosen) - log p(rejected)
            metrics[f"pref_accuracy{suffix}"] = float((margin > 0).float().mean())
            metrics[f"pref_margin{suffix}"] = float(margin.mean())
        return metrics

    def samples_markdown(self, title: str) -> str:
        """Markdown of the held-out samples of this stage's first and last evaluations (then forgotten,
        so the next stage starts its own); the runner prints it and writes <run dir>/samples.md."""
        if not self.shown:
            return ""
        first, last = self.shown[0], self.shown[-1]
        self.shown = []
        lines = [f"# {title}: samples from held-out prompts (VADER compound in brackets)", ""]
        for name, rows in (("Before", first), ("After", last)):
            mean = sum(r for _, _, r in rows) / max(len(rows), 1)
            lines += [f"## {name} (mean {mean:+.3f} over these {len(rows)})", ""]
            lines += [f"- **{p}**{c.rstrip()} [{r:+.3f}]".replace("\n", " ") for p, c, r in rows]
            lines.append("")
        return "\n".join(lines)


SHOWN = 6
"""Held-out prompts whose first sample each evaluation keeps for samples.md."""


def completion_nll(model, pairs: Sequence[Tuple[List[int], List[int]]], pad_id: int, batch_size: int = 64):
    """(summed NLL of each completion [N], its token count [N]) of (prompt ids, completion ids)
    ``pairs`` under ``model`` (a GPT or T5 engine's stages; every rank of a replica gets the same)."""
    import torch

    from nemo_rlhf.data.sft import SFTDataset
    from nemo_rlhf.generation.pipeline import as_chunks, pipeline_size
    from nemo_rlhf.modules.engine import lm_forward

    chunks = as_chunks(model)
    if pipeline_size() > 1:    # GPT stages in turn; the last stage's NLL on every rank
        from nemo_rlhf.modules.forward_only import lm_across_stages
    device = next(chunks[0].parameters()).device
    seq = max(len(p) + len(c) for p, c in pairs) - 1
    ds = SFTDataset.from_pairs(pairs, seq, pad_id, pad_id, add_eos=False)
    sums, counts = [], []
    with torch.no_grad():
        for s in range(0, len(ds), batch_size):
            tokens, labels, mask = (getattr(ds, k)[s:s + batch_size].to(device) for k in ("tokens", "labels", "loss_mask"))
            if pipeline_size() > 1:
                nll = lm_across_stages(model, tokens, labels)[0]
            else:      # GPT or T5 (the prompt into the encoder)
                nll = lm_forward(chunks[0], tokens, labels, mask)
            sums.append((nll.float() * mask).sum(-1).cpu())
            counts.append(mask.sum(-1).cpu())
    return torch.cat(sums).double(), torch.cat(counts).double()
