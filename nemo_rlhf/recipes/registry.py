"""The recipe table: Hydra's ``algorithm`` option -> recipe, and the run config built from it.

A row says which config block the recipe owns (``ppo:``, ``dpo:``, ...), which layouts and model
architectures it supports, and which Python-API inputs it takes. ``register_configs`` stores, for
every row, the Hydra option ``algorithm=<name>`` (sets ``algorithm.name`` and adds the recipe's
block with its defaults), so a YAML or command line only ever carries the chosen recipe's block
and a typo in it fails at start naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from nemo_rlhf.config.schema import RENAMED_KEYS, RunConfig
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.recipes import dpo, ilql, kto, ppo, rft, rm, sft


@dataclass(frozen=True)
class Recipe:
    name: str
    """The Hydra ``algorithm`` option and ``algorithm.name``."""
    module: ModuleType
    """Its file: ``Config`` (the block's dataclass or None), ``prepare(ctx, rcfg, block, **inputs)``
    (reads and checks the data before any training) and ``build(ctx, rcfg, block, data, rd,
    config_yaml) -> Job``."""
    block: Optional[str] = None
    """The RunConfig field holding its config block (None: no block)."""
    inputs: Tuple[str, ...] = ()
    """Keyword inputs the Python API may pass (nemo_rlhf.train(reward_fn=..., prompts=...))."""
    pipeline_parallel: bool = True
    sequence_parallel: bool = True
    t5: bool = True
    why_not: str = ""
    """Why a layout / architecture above is refused (shown in the error)."""
    layout_problem: Optional[Callable[[Any], Optional[str]]] = None
    """(run config) -> why its layout is refused, or None: checks finer than the flags above."""
    packs_at_forward: bool = False
    """data.packing packs each micro-batch at forward time (modules/packing.py) into a shape that
    varies, which virtual pipeline stages cannot take; False: it packs its dataset's rows (SFT, RFT),
    or refuses packing in ``layout_problem`` (ILQL)."""

    def config_block(self, rcfg) -> Any:
        return getattr(rcfg, self.block) if self.block else None


RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    Recipe("sft", sft, inputs=("samples",)),
    Recipe("ppo", ppo, "ppo", inputs=("reward_fn", "prompts", "eval_prompts"), packs_at_forward=True),
    Recipe("ilql", ilql, "ilql", inputs=("samples", "rewards"), sequence_parallel=False,
           layout_problem=ilql.layout_problem,
           why_not="its Q heads read the full hidden states, not sequence-parallel shards"),
    Recipe("rft", rft, "rft", inputs=("reward_fn", "prompts"), layout_problem=rft.layout_problem, t5=False,
           why_not="its SFT updates use the decoder-only batch layout"),
    Recipe("dpo", dpo, "dpo", packs_at_forward=True, layout_problem=dpo.layout_problem),
    Recipe("kto", kto, "kto", packs_at_forward=True, layout_problem=dpo.layout_problem),
    Recipe("rm", rm, "rm", t5=False, why_not="reward models are GPT", packs_at_forward=True),
)}


def recipe_for(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"algorithm.name: unknown algorithm {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]


def _run_config_class() -> type:
    """RunConfig plus one optional field per recipe block (only the chosen recipe's is set)."""
    fields = [(r.block, Optional[r.module.Config], dataclasses.field(default=None)) for r in RECIPES.values() if r.block]
    cls = dataclasses.make_dataclass("RecipeRunConfig", fields, bases=(RunConfig,),
                                     namespace={"__doc__": RunConfig.__doc__})
    cls.__module__ = __name__   # picklable by name
    return cls


RecipeRunConfig = _run_config_class()
_REGISTERED = False


def register_configs() -> None:
    """``run_schema`` (the run config) and one ``algorithm=<name>`` option per recipe in Hydra's ConfigStore."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RecipeRunConfig)
    for r in RECIPES.values():
        node = {"algorithm": {"name": r.name}}
        if r.block:
            node[r.block] = r.module.Config
        cs.store(group="algorithm", name=r.name, package="_global_", node=node)
    _REGISTERED = True


def check_renamed(overrides: Iterable[str]) -> None:
    """Stop on a command-line key that was renamed, naming the new key (``ppo.sft_steps=0`` ->
    ``ppo.sft_warmup.steps``)."""
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        block, _, rest = key.partition(".")
        if block in {r.block for r in RECIPES.values()} and rest in RENAMED_KEYS:
            raise ConfigError(f"{key} was renamed: use {block}.{RENAMED_KEYS[rest]}")


def to_run_config(cfg) -> RunConfig:
    """Merge ``cfg`` (a DictConfig, a plain dict, or a RunConfig) into the schema (unknown keys and type
    errors name the key) and validate it against its recipe's row."""
    if not isinstance(cfg, RunConfig):
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        name = OmegaConf.select(cfg, "algorithm.name", default="sft")
        recipe = recipe_for(name)
        cfg = _upgrade(cfg, recipe)
        schema = OmegaConf.structured(RecipeRunConfig)
        if recipe.block and OmegaConf.select(cfg, recipe.block) is None:
            schema[recipe.block] = OmegaConf.structured(recipe.module.Config)   # its defaults
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, cfg))
    validate(cfg)
    return cfg


def _upgrade(cfg: DictConfig, recipe: Recipe) -> DictConfig:
    """Configs saved before blocks were per recipe (checkpoint metadata): other recipes' blocks are
    dropped and renamed keys of the recipe's block move to their new place."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys()
                                      if k == recipe.block or k not in {r.block for r in RECIPES.values()}])
    block = OmegaConf.select(cfg, recipe.block) if recipe.block else None
    if isinstance(block, DictConfig):
        for old, new in RENAMED_KEYS.items():
            if old in block:
                OmegaConf.update(cfg, f"{recipe.block}.{new}", block[old], force_add=True)
                block.pop(old)
    return cfg


def validate(rcfg: RunConfig) -> Recipe:
    """The recipe of ``rcfg``, after the checks that depend on it (layouts, architecture, its block)."""
    recipe = recipe_for(rcfg.algorithm.name)
    p, name = rcfg.parallel, recipe.name
    if recipe.block and recipe.config_block(rcfg) is None:
        raise ConfigError(f"algorithm.name={name} but the config has no {recipe.block}: block "
                          f"(compose it with the Hydra option algorithm={name})")
    if not recipe.pipeline_parallel and p.pipeline_model_parallel_size > 1:
        raise ConfigError(f"algorithm.name={name} needs parallel.pipeline_model_parallel_size=1 ({recipe.why_not})")
    problem = recipe.layout_problem(rcfg) if recipe.layout_problem else None
    if problem:
        raise ConfigError(f"algorithm.name={name}: {problem}")
    if rcfg.data.packing:
        check_packing(recipe, rcfg)
    if not recipe.sequence_parallel and p.sequence_parallel:
        raise ConfigError(f"algorithm.name={name} needs parallel.sequence_parallel=false ({recipe.why_not})")
    if rcfg.model.arch == "t5":
        t5_ok = [r.name for r in RECIPES.values() if r.t5]
        if not recipe.t5:
            raise ConfigError(f"model.arch=t5 supports algorithm.name {'|'.join(t5_ok)}, got {name!r} ({recipe.why_not})")
        if name == "ppo" and rcfg.ppo.reward_model is not None:
            raise ConfigError("model.arch=t5 with ppo.reward_model is not supported (reward models are GPT)")
    return recipe


def check_packing(recipe: Recipe, rcfg: RunConfig) -> None:
    """data.packing where the model can take packed rows (GPT on megatron's local layers: an explicit
    block-diagonal causal mask; Transformer Engine's attention would need the packed-sequence
    parameters, cu_seqlens, which are not wired yet) and, for a recipe that packs at forward time,
    the layout can: each micro-batch packs into its own shape, which pipeline stages exchange with
    the activations (megatron's variable_seq_lengths), but not with virtual stages, whose schedule
    takes one activation shape per call (models/gpt.transformer_config)."""
    from nemo_rlhf.models.gpt import resolved_transformer_impl

    if rcfg.model.arch != "gpt":
        raise ConfigError(f"data.packing is a GPT path (model.arch={rcfg.model.arch}): set data.packing=false")
    if resolved_transformer_impl(rcfg.model) != "local":
        raise ConfigError("data.packing needs model.transformer_impl=local (Transformer Engine's attention takes "
                          "packed rows as cu_seqlens, not wired yet): set one of them")
    vpp = rcfg.parallel.virtual_pipeline_model_parallel_size
    if recipe.packs_at_forward and rcfg.parallel.pipeline_model_parallel_size > 1 and vpp:
        raise ConfigError(f"algorithm.name={recipe.name}: data.packing packs each micro-batch into its own shape, "
                          f"which the interleaved pipeline schedule cannot take (parallel."
                          f"virtual_pipeline_model_parallel_size={vpp}): set data.packing=false or drop the virtual stages")


def with_algorithm(rcfg: RunConfig, name: str) -> RunConfig:
    """``rcfg`` switched to recipe ``name`` (its block with defaults when ``rcfg`` has none)."""
    recipe = recipe_for(name)
    if not isinstance(rcfg, RecipeRunConfig):   # a bare RunConfig (no block fields yet)
        rcfg = RecipeRunConfig(**{f.name: getattr(rcfg, f.name) for f in dataclasses.fields(RunConfig)})
    changes: Dict[str, Any] = {"algorithm": dataclasses.replace(rcfg.algorithm, name=name)}
    if recipe.block and recipe.config_block(rcfg) is None:
        changes[recipe.block] = recipe.module.Config()
    return dataclasses.replace(rcfg, **changes)


def check_inputs(recipe: Recipe, given: Dict[str, Any]) -> None:
    """Python-API inputs the recipe does not take are refused, naming the recipes that do."""
    for key, value in given.items():
        if value is not None and key not in recipe.inputs:
            takers = [r.name for r in RECIPES.values() if key in r.inputs]
            raise ConfigError(f"{key} is an input of algorithm.name={'|'.join(takers)}, not of {recipe.name}")


def run_config_yaml(rcfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(rcfg))


__all__: Sequence[str] = ("RECIPES", "Recipe", "recipe_for", "register_configs", "to_run_config", "validate",
                          "with_algorithm", "check_inputs", "check_renamed", "RecipeRunConfig")
