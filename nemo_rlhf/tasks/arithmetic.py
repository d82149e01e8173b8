"""The arithmetic task: short problems with a verifiable answer, in a 14-symbol vocabulary.

A problem is ``x<op>y=`` with operands in [0, max_operand) and an operator from ``operators``
(``+``, ``-`` or ``*``); the completion is the exact result in decimal (a leading ``-`` when
negative) followed by EOS. Numbers have fixed widths, zero-padded (``07+45=52``, ``07-45=-38``,
``49+49=98``), so each digit sits at one position. Everything is a pure function of the constructor arguments: the
seed shuffles the set of all problems, the first ``num_eval`` are held out for evaluation, the
next ``num_sft`` are the SFT examples (a deliberately small set: a weak start), the next
``num_prompts`` the RL prompts. The three sets are disjoint by problem, so a held-out accuracy
never scores a problem the policy saw in training; another seed gives new splits.

Reward (``reward_fn``): 1.0 when the completion is exactly the answer, else 0.0.
Metrics (``evaluate``): ``accuracy`` (temperature samples, ``samples_per_problem`` per held-out
problem) and ``accuracy_greedy``, over the held-out problems.
"""
from __future__ import annotations

import operator as _op
from typing import Dict, List, Sequence, Tuple

import numpy as np

OPERATORS = {"+": _op.add, "-": _op.sub, "*": _op.mul}
SYMBOLS = "0123456789+-*="


class Arithmetic:
    """Problems, splits, reward and evaluation of the arithmetic task."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 50, operators: str = "+", num_sft: int = 300, num_prompts: int = 2000,
                 num_eval: int = 200, seed: int = 1000):
        if max_operand < 2:
            raise ValueError(f"task.max_operand must be >= 2, got {max_operand}")
        unknown = sorted(set(operators) - set(OPERATORS))
        if not operators or unknown or len(set(operators)) != len(operators):
            raise ValueError(f"task.operators must be distinct characters of {''.join(OPERATORS)!r}, got {operators!r}")
        problems = [(x, o, y) for o in operators for x in range(max_operand) for y in range(max_operand)]
        need = num_eval + num_sft + num_prompts
        if need > len(problems):
            raise ValueError(f"task.num_eval + num_sft + num_prompts = {need} problems, but max_operand={max_operand} "
                             f"with operators {operators!r} has only {len(problems)} distinct problems")
        self.max_operand, self.operators, self.seed = max_operand, operators, seed
        order = np.random.RandomState(seed).permutation(len(problems))
        shuffled = [problems[i] for i in order]
        self.eval_problems = shuffled[:num_eval]
        self.sft_problems = shuffled[num_eval:num_eval + num_sft]
        self.prompt_problems = shuffled[num_eval + num_sft:need]
        # fixed widths (zero-padded) keep each digit at one position: "07+45=52"
        self.width = len(str(max_operand - 1))
        self.answer_width = max(len(str(abs(OPERATORS[o](x, y)))) for x, o, y in problems)
        self.max_length = max(len(self.answer(p)) for p in problems) + 1   # answer tokens + EOS
        self.prompt_length = len(self.question(problems[0]))

    @property
    def vocab(self) -> List[str]:
        return list(SYMBOLS)

    def question(self, problem) -> str:
        return question(problem, self.width)

    def answer(self, problem) -> str:
        return answer(problem, self.answer_width)

    def is_correct(self, sample: str) -> bool:
        return is_correct(sample, self.answer_width)

    # -- what recipes read --------------------------------------------------------------------
    def sft_samples(self) -> List[List[str]]:
        """[prompt, completion] pairs of the SFT problems."""
        return [[self.question(p), self.answer(p)] for p in self.sft_problems]

    def prompts(self) -> List[str]:
        return [self.question(p) for p in self.prompt_problems]

    def reward_fn(self, samples: Sequence[str], prompts=None, completions=None, **_) -> List[float]:
        """1.0 where the text after '=' is exactly the answer of the text before it, else 0.0."""
        return [float(self.is_correct(s)) for s in samples]

    def evaluate(self, model, tokenizer, samples_per_start: int, seed: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, max_new_tokens=None, logits_processor=None,
                 suffix: str = "") -> Dict[str, float]:
        """Held-out accuracy of temperature samples and of greedy decoding, sharded over data-parallel
        ranks with the same result at any layout (nemo_rlhf/tasks/sharded.py); ``logits_processor``:
        as generation.sampling.generate takes it, e.g. ILQL's."""
        from nemo_rlhf.generation.sampling import SamplingParams
        from nemo_rlhf.tasks.sharded import sharded_sums

        base = dict(max_new_tokens=max_new_tokens or self.max_length, eos_id=tokenizer.eos_id,
                    pad_id=tokenizer.pad_id)

        def accuracy(problems, params) -> float:
            texts = [self.question(p) for p in problems]
            score = lambda i, ids: (float(self.is_correct(texts[i] + tokenizer.decode(ids))),)
            total = sharded_sums(model, [tokenizer.encode(t) for t in texts], params, seed, score, 1,
                                 tokenizer.vocab_size, logits_processor)
            return total[0] / max(total[1], 1.0)

        sampled = [p for p in self.eval_problems for _ in range(samples_per_start)]
        return {f"accuracy{suffix}": accuracy(sampled, SamplingParams(temperature=temperature, top_k=top_k,
                                                                        top_p=top_p, **base)),
                f"accuracy{suffix}_greedy": accuracy(self.eval_problems, SamplingParams(greedy=True, **base))}


def question(problem: Tuple[int, str, int], width: int) -> str:
    """``x<op>y=`` with the operands zero-padded to ``width`` digits."""
    x, o, y = problem
    return f"{x:0{width}d}{o}{y:0{width}d}="


def answer(problem: Tuple[int, str, int], width: int) -> str:
    """The result zero-padded to ``width`` digits, after a '-' when negative."""
    x, o, y = problem
    r = OPERATORS[o](x, y)
    return ("-" if r < 0 else "") + f"{abs(r):0{width}d}"


def is_correct(sample: str, width: int) -> bool:
    """``sample`` = question + completion (special tokens stripped): the completion is exactly the
    answer written with ``width`` digits."""
    q, eq, completion = sample.partition("=")
    if not eq:
        return False
    for o in OPERATORS:
        x, sep, y = q.partition(o)
        if sep and x.isdigit() and y.isdigit():
            return completion == answer((int(x), o, int(y)), width)
    return False
