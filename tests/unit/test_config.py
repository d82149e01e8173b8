"""Configs compose through Hydra into the dataclass schemas; bad values fail at start naming the key."""
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
