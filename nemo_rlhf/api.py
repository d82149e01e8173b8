"""Python API in the spirit of trlX::

    import nemo_rlhf
    config = nemo_rlhf.default_ppo_config()          # an editable RunConfig (ppo_tiny)
    config.trainer.max_steps = 20
    trainer = nemo_rlhf.train(reward_fn=my_fn, prompts=["b", "c"], config=config)
    trainer.generate(["b", "d"], greedy=True)
    trainer.save_pretrained("out/")

``model_path`` is a nemo_rlhf / megatron dist checkpoint directory (``.../checkpoints/step_X``), a
Hugging Face model directory (config.json + safetensors; the architecture and tokenizer come from
it), a NeMo ``.nemo`` file or a NeMo 2 / Megatron-LM dist checkpoint;
with none, PPO starts with an SFT warm-up on the task's data (``config.ppo.sft_warmup``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from nemo_rlhf.config import CONF_DIR
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.recipes.registry import RECIPES, check_renamed, register_configs, to_run_config, with_algorithm


def _compose(name: str, overrides: Sequence[str] = ()) -> RunConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    check_renamed(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose(config_name=name, overrides=list(overrides)))


def default_ppo_config(*overrides: str) -> RunConfig:
    """The ppo_tiny recipe as an editable dataclass; ``overrides`` are Hydra-style key=value."""
    return _compose("ppo_tiny", overrides)


def default_sft_config(*overrides: str) -> RunConfig:
    return _compose("sft_tiny", overrides)


def default_ilql_config(*overrides: str) -> RunConfig:
    return _compose("ilql_tiny", overrides)


def default_grpo_config(*overrides: str) -> RunConfig:
    """The grpo_tiny recipe: the online-RL loop without a critic, group-relative advantages."""
    return _compose("grpo_tiny", overrides)


def default_rloo_config(*overrides: str) -> RunConfig:
    return _compose("rloo_tiny", overrides)


def default_rft_config(*overrides: str) -> RunConfig:
    """The rft_tiny recipe: rejection fine-tuning (algorithm=rft, its own rft: block)."""
    return _compose("rft_tiny", overrides)


class Trainer:
    """What ``nemo_rlhf.train`` returns: the trained policy, its tokenizer and the run summary."""

    def __init__(self, summary, ctx):
        self.summary, self._ctx = summary, ctx
        self.module = ctx.module
        self.tokenizer = ctx.tokenizer
        self.run_dir = ctx.summary_dir or ctx.run_dir
        self.config: RunConfig = ctx.rcfg

    @property
    def _engine(self):
        return getattr(self.module, "actor", None) or self.module.engine

    def generate(self, prompts: List[str], max_new_tokens: Optional[int] = None, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: float = 1.0, greedy: bool = False, seed: int = 0,
                 stop_strings: Sequence[str] = (), beta: Optional[float] = None) -> List[str]:
        """Completions (decoded, without the prompt) for ``prompts``; ragged prompts are left-padded.
        ILQL policies sample with logits shifted by ``beta`` (default ``config.ilql.beta``) and
        top-k ``config.ilql.gen_top_k``."""
        import torch

        from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad

        tok = self.tokenizer
        processor = None
        recipe = RECIPES[self.config.algorithm.name]
        if hasattr(recipe.module, "generation_processor"):   # ILQL: logits shifted by its heads
            processor, default_top_k = recipe.module.generation_processor(
                self._engine.stages[-1], recipe.config_block(self.config), beta)
            top_k = default_top_k if top_k is None else top_k
        top_k = top_k or 0
        ids, lengths = left_pad([tok.encode(p) for p in prompts], tok.pad_id)
        out = generate(self._engine.stages, ids, SamplingParams(
            max_new_tokens=max_new_tokens or self.config.task.max_length, temperature=temperature, top_k=top_k,
            top_p=top_p, greedy=greedy, eos_id=tok.eos_id, pad_id=tok.pad_id, stop_strings=tuple(stop_strings)),
            generator=torch.Generator().manual_seed(seed), vocab_size=tok.vocab_size, prompt_lengths=lengths,
            decode=tok.decode, logits_processor=processor)
        return [tok.decode(c[m.bool()].tolist()) for c, m in zip(out.completions, out.mask)]

    def save_pretrained(self, directory, megatron: bool = True) -> Path:
        """The policy as a Hugging Face model in ``directory`` (config.json, model.safetensors and
        the tokenizer files: the imported model's when ``model.path`` was a Hugging Face directory,
        else the task's character vocabulary as tokenizer.json) that
        ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads, gathered from any
        TP/PP (heads such as the PPO value head stay out). With ``megatron`` (default) also the
        megatron dist checkpoint under ``directory/checkpoints`` (loadable at any TP/PP with
        ``model.path=``) and config.yaml; returns that checkpoint's path, else ``directory``."""
        from nemo_rlhf.runner import export

        return export(self.module, self._engine, self.config, self.tokenizer, directory, megatron)


def checkpoint_model_config(model, model_path):
    """``model`` pointed at ``model_path``. For a Hugging Face directory or a .nemo file the
    architecture fields go back to the schema defaults, so the checkpoint's own config decides
    (the recipes' tiny architecture does not conflict with it); training fields stay."""
    import dataclasses

    from nemo_rlhf.interop import ARCH_FIELDS
    from nemo_rlhf.interop.formats import checkpoint_format

    if checkpoint_format(model_path) in ("hf", "nemo1"):
        defaults = type(model)()
        model = dataclasses.replace(model, **{k: getattr(defaults, k) for k in ARCH_FIELDS})
    return dataclasses.replace(model, path=str(model_path))


def train(model_path: Optional[str] = None, reward_fn: Optional[Callable] = None,
          prompts: Optional[List[str]] = None, eval_prompts: Optional[List[str]] = None,
          samples: Optional[list] = None, rewards: Optional[List[float]] = None,
          config: Optional[RunConfig] = None, run_dir: Optional[str] = None,
          algorithm: Optional[str] = None) -> Trainer:
    """As trlX: PPO when a ``reward_fn`` is given (``config`` defaults to ppo_tiny), ILQL when
    ``samples`` and ``rewards`` are (ilql_tiny), SFT on ``samples`` alone or on the task's data
    (sft_tiny). A sample is a string or a [prompt, completion] pair; SFT trains on completion
    tokens only. ``reward_fn(samples, prompts=..., completions=...) -> list of floats``. PPO
    ``prompts`` (and ``eval_prompts``) may have any token lengths: they are left-padded per batch and
    the padding is masked out of generation, the experience forwards and the updates; the reward
    function sees each prompt without padding. Each must fit in ``model.seq_length`` minus
    ``generation.max_new_tokens``.
    ``algorithm`` picks the online-RL preset for a ``reward_fn`` when no ``config`` is given:
    "ppo" (ppo_tiny), "grpo" (grpo_tiny), "rloo" (rloo_tiny).
    ``model_path``: a Hugging Face directory or .nemo file brings its architecture and tokenizer
    (:func:`checkpoint_model_config`); a nemo_rlhf checkpoint must match ``config.model``."""
    import dataclasses
    import time

    from nemo_rlhf.runner import run

    if reward_fn is not None and samples is not None:
        raise ValueError("give either reward_fn (online PPO) or samples + rewards (offline ILQL), not both")
    if rewards is not None and samples is None:
        raise ValueError("rewards need samples (one reward per sample)")
    # trlX's convention: reward_fn -> PPO; samples + rewards -> ILQL; samples alone -> SFT;
    # nothing -> whatever the config says (sft_tiny without one)
    config = choose_config({"reward_fn": reward_fn, "rewards": rewards, "samples": samples}, config, algorithm)
    if model_path is not None:
        config = dataclasses.replace(config, model=checkpoint_model_config(config.model, model_path))
    run_dir = run_dir or f"runs/api_{config.algorithm.name}/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    summary, ctx = run(config, run_dir, return_context=True, reward_fn=reward_fn, prompts=prompts,
                       eval_prompts=eval_prompts, samples=samples, rewards=rewards)
    return Trainer(summary, ctx)


def choose_config(given, config: Optional[RunConfig], preset: Optional[str]) -> RunConfig:
    """train()'s config: ``config``, or the preset ``algorithm=`` names, or the one the inputs
    pick (trlX's convention: reward_fn -> PPO; samples + rewards -> ILQL; samples alone -> SFT;
    nothing -> sft_tiny), with its algorithm set to the one the inputs pick."""
    algorithm = next((name for key, name in INPUT_ALGORITHMS if given[key] is not None), None)
    if preset is not None:
        if preset not in ONLINE_PRESETS:
            raise ValueError(f"algorithm={preset!r}: the online-RL algorithms are {', '.join(ONLINE_PRESETS)}")
        if given["reward_fn"] is None:
            raise ValueError(f"algorithm={preset!r} is online RL: give a reward_fn")
        if config is not None:
            raise ValueError(f"give either algorithm={preset!r} or config= (e.g. nemo_rlhf.default_{preset}_config("
                             f"'trainer.max_steps=10')), not both")
        config = ONLINE_PRESETS[preset]()
    if config is None:
        config = DEFAULT_CONFIGS.get(algorithm, default_sft_config)()
    if preset is None and algorithm is not None and config.algorithm.name != algorithm:
        config = with_algorithm(config, algorithm)
    return config


INPUT_ALGORITHMS = (("reward_fn", "ppo"), ("rewards", "ilql"), ("samples", "sft"))
"""trlX's convention, first match wins: which input picks which algorithm."""
DEFAULT_CONFIGS = {"ppo": default_ppo_config, "ilql": default_ilql_config, "sft": default_sft_config}
ONLINE_PRESETS = {"ppo": default_ppo_config, "grpo": default_grpo_config, "rloo": default_rloo_config,
                  "rft": default_rft_config}
"""train(algorithm=...): the online-RL presets (ppo, grpo, rloo: the ppo: block; rft: the rft: block)."""
