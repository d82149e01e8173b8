"""Built-in tasks (``task.name``): data, prompts, a reward and an evaluation for tiny CPU runs.

Every task has ``name``, ``vocab`` (its symbols, one token each), ``max_length`` (completion
tokens generation needs, EOS included), ``sft_samples()`` ([prompt, completion] strings),
``prompts()`` (RL prompts), ``reward_fn(samples, prompts=, completions=)`` and
``evaluate(model, tokenizer, samples_per_start, seed, temperature=, top_k=, top_p=,
max_new_tokens=)``; a task with its own tokenizer (sentiment: BPE trained on its text) has
``tokenizer()``, which the runner uses instead of one token per ``vocab`` symbol, and a task that
builds preference pairs for DPO has ``preference_pairs(tokenizer, num_pairs, seed)``. Only randomwalks builds preference pairs and rewarded samples (``walks``) for
the offline recipes (DPO, KTO, RM, ILQL); the others read data.train_file there.
"""
from __future__ import annotations

from nemo_rlhf.errors import ConfigError

TASKS = ("randomwalks", "arithmetic", "sentiment")


def build_task(tc):
    """The task of a ``task:`` config block (nemo_rlhf.config.schema.TaskConfig)."""
    if tc.name == "randomwalks":
        from nemo_rlhf.tasks.randomwalks import RandomWalks

        try:
            task = RandomWalks(tc.num_nodes, tc.edge_prob, tc.max_length, tc.num_walks, tc.seed)
        except ValueError as e:
            raise ConfigError(f"task: {e}") from None
        if not task.eval_starts:
            raise ConfigError(f"task: no start node reaches the goal 'a' in fewer than task.max_length={tc.max_length} "
                              f"nodes on this graph (num_nodes={tc.num_nodes}, edge_prob={tc.edge_prob}, seed={tc.seed}),"
                              f" so there is nothing to evaluate: raise task.edge_prob or task.max_length, or change "
                              f"task.seed")
        return task
    if tc.name == "arithmetic":
        from nemo_rlhf.tasks.arithmetic import Arithmetic

        try:
            return Arithmetic(tc.max_operand, tc.operators, tc.num_sft, tc.num_prompts, tc.num_eval, tc.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if tc.name == "sentiment":
        from nemo_rlhf.tasks.sentiment import Sentiment

        try:
            return Sentiment(tc.corpus, tc.vocab_size, tc.prompt_words, tc.max_length, tc.max_passage_tokens,
                             tc.heldout_fraction, tc.num_eval, tc.num_eval_passages, tc.num_eval_pairs,
                             tc.summary_verses, tc.context_verses, tc.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    raise ConfigError(f"task.name: unknown task {tc.name!r} (known: {', '.join(TASKS)})")


def offline_data_task(task, recipe: str):
    """``task`` when it can build ``recipe``'s training data (the randomwalks walks), else a ConfigError."""
    if not hasattr(task, "walks"):
        raise ConfigError(f"task.name={task.name} builds no data for algorithm.name={recipe} (only randomwalks "
                          f"does): give data.train_file")
    return task
