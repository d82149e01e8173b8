"""What recipes share: the run context handed to every recipe, the ``Job`` a recipe hands back to
the runner, and the data helpers several recipes use. Nothing here imports a recipe or the runner."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.logging import get_logger
from nemo_rlhf.weights import load_weights

log = get_logger(__name__)


@dataclass
class RunContext:
    """What every recipe's run needs; built once per command by the runner."""

    rcfg: RunConfig
    """The validated config of the command (a warm-up stage runs with its own, see Job)."""
    env: Any
    """The process layout (nemo_rlhf.parallel.DistEnv)."""
    dp_rank: int
    dp_size: int
    run_dir: Path
    task: Any
    """The built-in task (nemo_rlhf.tasks: randomwalks or arithmetic): data, prompts, reward, metrics."""
    tokenizer: Any
    module: Any = None
    """The last stage's trained LightningModule (the Python API returns it)."""
    summary_dir: Optional[Path] = None
    """Where the last stage wrote summary.json (run_dir, or its restart-<time> subdir with resume=never)."""

    def evaluate_fn(self, engine, step: int) -> Dict[str, Any]:
        """Task metrics of the policy in ``engine`` (at PP > 1 sampled across the pipeline stages)."""
        rcfg, gen = self.rcfg, self.rcfg.generation
        return self.task.evaluate(engine.stages, self.tokenizer, rcfg.task.eval_samples_per_start,
                                  seed=rcfg.trainer.seed + step, temperature=gen.temperature,
                                  top_k=gen.top_k, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)


def _noop(*_args) -> None:
    return None


@dataclass
class Job:
    """What a recipe's ``build`` hands to the runner.

    The runner then either resumes ``engine`` (+ ``extra_engines``) from the run directory's
    checkpoint and calls ``after_resume(loop_state, run_dir)``, or starts fresh: ``load_initial(path)``
    with the initial weights when there are any (``model.path`` or the SFT warm-up's checkpoint),
    then ``after_start()``; then it fits ``module`` and writes the summary with ``summary`` added."""

    module: Any
    """A TrainingSystem (nemo_rlhf.modules.loop)."""
    load_initial: Callable[[str], None]
    engine: Any = None
    """The engine whose step / optimizer the checkpoint's loop state belongs to (default module.engine)."""
    extra_engines: Optional[Dict[str, Any]] = None
    """Other models saved in the same checkpoint: {name: (chunks, optimizer, scheduler)}."""
    after_start: Callable[[], None] = _noop
    after_resume: Callable[[Dict[str, Any], Any], None] = _noop
    summary: Dict[str, Any] = field(default_factory=dict)


def load_initial_weights(engine, path, **kwargs) -> None:
    """Initial weights from ``path`` (any format nemo_rlhf.weights reads) into ``engine``; heads the
    checkpoint lacks start fresh (``skip_prefixes``, default: the value head)."""
    load_weights(path, engine.chunks, **kwargs)
    engine.optimizer.reload_model_params()


def file_examples(ctx: RunContext, rcfg: RunConfig, schema: str, max_new_tokens: int = 0):
    """(tokenised examples, {"data": counts}) from this stage's data.train_file, or (None, {})
    without one (an SFT warm-up stage has none: it reads the task, not the recipe's file)."""
    from nemo_rlhf.data.files import load_examples

    if rcfg.data.train_file is None:
        return None, {}
    examples, report = load_examples(rcfg.data, schema, ctx.tokenizer, rcfg.model.seq_length, max_new_tokens)
    log.info("data.train_file=%s: %d examples (%d truncated, %d dropped)", rcfg.data.train_file,
             report.examples, report.truncated, report.dropped)
    return examples, {"data": {"train_file": str(rcfg.data.train_file), **report.as_dict()}}


def walk_pairs(ctx: RunContext, num_pairs: int) -> List[Tuple[List[int], List[int], List[int]]]:
    """(prompt, chosen + EOS, rejected + EOS) token ids: the task's own pairs where it builds them
    (sentiment: a passage, its first sentence, another's), else two walks from one start, the more
    optimal chosen."""
    from nemo_rlhf.data.preference import randomwalk_pairs
    from nemo_rlhf.tasks import offline_data_task

    if hasattr(ctx.task, "preference_pairs"):
        try:
            return ctx.task.preference_pairs(ctx.tokenizer, num_pairs, ctx.rcfg.trainer.seed)
        except ValueError as e:
            raise ConfigError(f"task: {e}") from None
    eos = ctx.tokenizer.eos_id
    task = offline_data_task(ctx.task, ctx.rcfg.algorithm.name)
    return [(p, c + [eos], r + [eos])
            for p, c, r in randomwalk_pairs(task, ctx.tokenizer, num_pairs, ctx.rcfg.trainer.seed)]


def encode_prompts(tokenizer, prompts, max_tokens: Optional[int] = None, name: str = "prompts"):
    """Token-id lists of ``prompts`` (strings, any lengths; at most ``max_tokens`` tokens each =
    model.seq_length - generation.max_new_tokens, the room generation leaves)."""
    if isinstance(prompts, str) or not prompts:
        raise ConfigError(f"{name} must be a non-empty list of non-empty strings")
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{name}[{i}] must be a non-empty string, got {p!r}")
        try:
            ids.append(list(tokenizer.encode(p)))
        except ValueError as e:
            raise ConfigError(f"{name}[{i}]: {e}") from None
        if not ids[-1]:
            raise ConfigError(f"{name}[{i}] encodes to no tokens")
        if max_tokens is not None and len(ids[-1]) > max_tokens:
            raise ConfigError(f"{name}[{i}] has {len(ids[-1])} tokens, more than model.seq_length - "
                              f"generation.max_new_tokens = {max_tokens}")
    return ids


def replace_algorithm(rcfg: RunConfig, name: str) -> RunConfig:
    return dataclasses.replace(rcfg, algorithm=dataclasses.replace(rcfg.algorithm, name=name))

