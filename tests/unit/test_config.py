"""Configs compose through Hydra into the dataclass schemas; bad values fail at start naming the key."""
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from nemo_rlhf.config import ConfigError
from nemo_rlhf.recipes.registry import register_configs, to_run_config
from nemo_rlhf.config.schema import ParallelConfig
from nemo_rlhf.parallel.distributed import detect_launch_env, validate_layout
from tests.conftest import train

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


def load(overrides=(), name="sft_tiny"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_run_config(compose(config_name=name, overrides=list(overrides)))


def test_sft_tiny_composes_with_documented_keys():
    cfg = load()
    assert cfg.model.num_layers == 2 and cfg.task.name == "randomwalks"
    assert cfg.task.num_walks == 5000 and cfg.trainer.max_steps == 1000
    cfg = load(["task.num_nodes=10", "task.edge_prob=0.3", "task.max_length=6", "task.seed=5", "task.num_walks=10"])
    assert (cfg.task.num_nodes, cfg.task.edge_prob, cfg.task.max_length, cfg.task.seed) == (10, 0.3, 6, 5)


@pytest.mark.parametrize("config", [p.stem for p in Path(CONF).glob("*.yaml")])
def test_every_top_level_config_composes(config):
    load(name=config)


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        load(["model.num_layerz=3"])
    assert "num_layerz" in str(e.value.__cause__ or e.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        load(["trainer.max_steps=many"])
    assert "max_steps" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tensor_model_parallel_size=3"], "model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"),
    (["parallel.pipeline_model_parallel_size=4"], "model.num_layers=2 is not divisible"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1"),
    (["trainer.global_batch_size=50"], "trainer.global_batch_size=50 is not divisible by trainer.micro_batch_size=32"),
    (["task.edge_prob=0"], "task.edge_prob"),
    (["task.num_nodes=40"], "task.num_nodes"),
    (["model.seq_length=8"], "model.seq_length=8 is shorter"),
    (["optim.lr=-1"], "optim.lr"),
    (["model.precision=fp64"], "model.precision"),
    (["parallel.virtual_pipeline_model_parallel_size=2"], "virtual_pipeline_model_parallel_size needs"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
     "model.num_layers=2 is not divisible by .*virtual_pipeline_model_parallel_size=4"),
])
def test_bad_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load(overrides)


def test_world_size_must_be_divisible_by_tp_times_pp():
    with pytest.raises(ConfigError, match="world size 6 is not divisible by .*tensor_model_parallel_size.* = 4"):
        validate_layout(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6)
    assert validate_layout(ParallelConfig(tensor_model_parallel_size=2), 8) == 4


def test_launch_env_from_torchrun_and_slurm():
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                             "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes, env.launcher) == (3, 8, 1, 4, "torchrun")
    env = detect_launch_env({"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                             "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
                             "SLURM_JOB_ID": "42"})
    assert (env.rank, env.world_size, env.local_world_size, env.num_nodes) == (5, 8, 4, 2)
    assert env.master_addr == "gpu07" and env.launcher == "slurm"
    assert detect_launch_env({}).launcher == "single"


@pytest.mark.slow
def test_cli_reports_bad_layout_and_unknown_key(tmp_path):
    proc = train([f"hydra.run.dir={tmp_path / 'a'}", "parallel=tp2"])
    assert proc.returncode != 0
    assert "world size 1 is not divisible by parallel.tensor_model_parallel_size" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = train([f"hydra.run.dir={tmp_path / 'b'}", "trainer.max_stepz=3"])
    assert proc.returncode != 0 and "max_stepz" in proc.stderr


@pytest.mark.parametrize("name, overrides, message", [
    ("rft_tiny", ["parallel=pp2", "rft.reward_model=/x"], "algorithm.name=rft: rft.reward_model needs parallel.pipeline_model_parallel_size=1"),
    ("ilql_tiny", ["parallel=tp2_sp"], "algorithm.name=ilql needs parallel.sequence_parallel=false"),
    ("rm_tiny", ["model=t5_tiny"], "model.arch=t5 supports algorithm.name sft|ppo|ilql|dpo|kto, got 'rm'"),
    ("dpo_tiny", ["dpo.loss_type=cpo2"], "dpo.loss_type must be sigmoid|ipo|hinge|robust|simpo|orpo"),
    ("ppo_tiny", ["ppo.sft_warmup.steps=-1"], "sft_warmup.steps must be >= 0"),
    ("sft_tiny", ["optim.scheduler=cosine", "optim.lr=1e-6", "optim.min_lr=1e-5"], "optim.min_lr=1e-05 is above optim.lr=1e-06"),
    ("dpo_tiny", ["parallel=pp2_vpp2", "model.num_layers=4", "data.packing=true"], "algorithm.name=dpo: data.packing packs each micro-batch into its own shape, which the interleaved pipeline schedule cannot take"),
    ("kto_tiny", ["parallel=pp2_vpp2", "model.num_layers=4", "data.packing=true"], "algorithm.name=kto: data.packing packs each micro-batch"),
    ("ppo_tiny", ["parallel=pp2_vpp2", "model.num_layers=4", "data.packing=true"], "algorithm.name=ppo: data.packing packs each micro-batch"),
    ("rm_tiny", ["parallel=pp2_vpp2", "model.num_layers=4", "data.packing=true"], "algorithm.name=rm: data.packing packs each micro-batch"),
    ("ilql_tiny", ["data.packing=true"], "algorithm.name=ilql: data.packing is not supported"),
    ("dpo_tiny", ["parallel=pp2", "dpo.reference=model"], "algorithm.name=dpo: dpo.reference=model needs parallel.pipeline_model_parallel_size=1"),
    ("kto_tiny", ["parallel=pp2", "kto.reference=model"], "algorithm.name=kto: kto.reference=model needs parallel.pipeline_model_parallel_size=1"),
])
def test_recipe_rows_and_blocks_check_their_own_keys(name, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(overrides, name=name)


@pytest.mark.parametrize("name", ["ppo_tiny", "grpo_tiny", "rft_tiny", "ilql_tiny", "rm_tiny"])
def test_sampling_and_head_recipes_accept_virtual_pipeline_stages(name):
    """Rollouts, evaluation and the heads run across interleaved stages (checked against PP=1 by the
    2-rank launch: gen_pp2_vpp2, {actor,critic,rm,ilql}_pp2_vpp2)."""
    cfg = load(["parallel=pp2_vpp2", "model.num_layers=4"], name=name)
    assert cfg.parallel.virtual_pipeline_model_parallel_size == 2


def test_each_run_carries_only_its_recipes_block():
    from nemo_rlhf.recipes.registry import RECIPES

    for name, block in (("ppo_tiny", "ppo"), ("dpo_tiny", "dpo"), ("kto_tiny", "kto"), ("sft_tiny", None)):
        cfg = load(name=name)
        assert [r.block for r in RECIPES.values() if r.block and getattr(cfg, r.block) is not None] == \
            ([block] if block else [])
    # algorithm=<name> on the command line brings that recipe's block with its defaults
    cfg = load(["algorithm=dpo"], name="sft_tiny")
    assert cfg.algorithm.name == "dpo" and cfg.dpo.beta == 0.1 and cfg.dpo.sft_warmup.steps == 1000
    with pytest.raises(ConfigCompositionException, match="Available options in 'algorithm'"):
        load(["algorithm=grpo9"])


def test_renamed_keys_name_the_new_key():
    from nemo_rlhf.recipes.registry import check_renamed

    with pytest.raises(ConfigError, match=re.escape("ppo.sft_steps was renamed: use ppo.sft_warmup.steps")):
        check_renamed(["trainer.max_steps=3", "ppo.sft_steps=0"])
    with pytest.raises(ConfigError, match=re.escape("dpo.sft_lr was renamed: use dpo.sft_warmup.lr")):
        check_renamed(["+dpo.sft_lr=1e-3"])
    check_renamed(["ppo.sft_warmup.steps=0", "trainer.sft_steps_note=1"])   # not a recipe block: Hydra's business


def test_configs_saved_before_per_recipe_blocks_still_load():
    """Checkpoint metadata written before this layout holds every algorithm's block and the flat
    sft_* keys: the chosen recipe's keys move to sft_warmup, the other blocks are dropped."""
    from omegaconf import OmegaConf

    from nemo_rlhf.recipes.registry import to_run_config

    old = {"algorithm": {"name": "ppo"}, "trainer": {"max_steps": 7},
           "ppo": {"num_rollouts": 32, "sft_steps": 0, "sft_lr": 0.01},
           "dpo": {"beta": 0.5, "sft_steps": 3}, "kto": {"beta": 0.2}, "ilql": {"tau": 0.5}, "rm": {"margin": 1.0}}
    cfg = to_run_config(OmegaConf.create(old))
    assert cfg.trainer.max_steps == 7 and cfg.ppo.num_rollouts == 32
    assert (cfg.ppo.sft_warmup.steps, cfg.ppo.sft_warmup.lr) == (0, 0.01)
    assert cfg.dpo is None and cfg.kto is None and cfg.ilql is None and cfg.rm is None


def test_api_inputs_are_checked_against_the_recipe_row():
    from nemo_rlhf.recipes.registry import RECIPES, check_inputs

    check_inputs(RECIPES["ppo"], {"reward_fn": len, "prompts": ["a"], "samples": None})
    with pytest.raises(ConfigError, match=r"reward_fn is an input of algorithm.name=ppo\|rft, not of sft"):
        check_inputs(RECIPES["sft"], {"reward_fn": len})
    with pytest.raises(ConfigError, match="rewards is an input of algorithm.name=ilql, not of dpo"):
        check_inputs(RECIPES["dpo"], {"rewards": [1.0]})


@pytest.mark.slow
def test_cli_names_a_renamed_key(tmp_path):
    proc = train([f"hydra.run.dir={tmp_path / 'a'}", "ppo.sft_steps=0"], config="ppo_tiny")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ppo.sft_steps was renamed: use ppo.sft_warmup.steps" in proc.stderr
    assert not (tmp_path / "a").exists()


def test_api_algorithm_names_an_online_rl_preset():
    from nemo_rlhf.api import choose_config

    f = lambda samples, prompts, completions: [0.0] * len(samples)
    given = {"reward_fn": f, "rewards": None, "samples": None}
    for name, estimator, critic in (("grpo", "grpo", "none"), ("rloo", "rloo", "none"), ("ppo", "gae", "separate")):
        cfg = choose_config(given, None, name)
        assert cfg.algorithm.name == "ppo" and (cfg.ppo.advantage_estimator, cfg.ppo.critic) == (estimator, critic)
    assert choose_config(given, None, None).ppo.advantage_estimator == "gae"
    rft = choose_config(given, None, "rft")                  # its own recipe, kept although reward_fn picks ppo
    assert rft.algorithm.name == "rft" and rft.rft.num_generations == 8
    with pytest.raises(ValueError, match="the online-RL algorithms are ppo, grpo, rloo, rft"):
        choose_config(given, None, "dapo")
    with pytest.raises(ValueError, match="algorithm='grpo' is online RL: give a reward_fn"):
        choose_config({"reward_fn": None, "rewards": None, "samples": ["ab"]}, None, "grpo")
    with pytest.raises(ValueError, match="default_grpo_config"):
        choose_config(given, choose_config(given, None, "grpo"), "grpo")
