import pytest
import torch

from nemo_rlhf.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, read_meta
from nemo_rlhf.checkpoint import save_checkpoint
from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
from nemo_rlhf.modules.engine import MegatronEngine


@pytest.fixture
def engine(mp):
    torch.manual_seed(0)
    return MegatronEngine(ModelConfig(), ParallelConfig(), OptimConfig(), vocab_size=20, max_steps=10)


def test_save_load_roundtrip_keep_last_and_latest(engine, tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, engine.chunks, None, engine.scheduler, {"k": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000003"
    meta = read_meta(tmp_path / "step_0000003")
    assert meta["step"] == 3 and meta["layout"]["tensor_model_parallel_size"] == 1
    saved = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    loop = load_checkpoint(tmp_path / "step_0000003", engine.chunks, scheduler=engine.scheduler)
    assert loop["k"] == 3 and loop["step"] == 3
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, saved[n])


def test_interrupted_write_is_never_loaded(engine, tmp_path):
    save_checkpoint(tmp_path, 5, engine.chunks)
    # a save killed mid-write leaves step_X.tmp without metadata: ignored, previous one still latest
    partial = tmp_path / "step_0000010.tmp"
    partial.mkdir()
    (partial / "garbage").write_text("half")
    assert latest_checkpoint(tmp_path).name == "step_0000005"
    with pytest.raises(CheckpointError, match="not a complete nemo_rlhf checkpoint"):
        read_meta(partial)
    # the next save of that step cleans the leftover and lands atomically
    save_checkpoint(tmp_path, 10, engine.chunks)
    assert latest_checkpoint(tmp_path).name == "step_0000010" and not partial.exists()


def test_rotation_deletes_only_the_saving_runs_checkpoints(engine, tmp_path):
    """keep_last rotates the checkpoints of the run that saves (its run_id); another run's, or one
    saved before run ids existed, is never deleted, and a save never replaces another run's step."""
    save_checkpoint(tmp_path, 1, engine.chunks, keep_last=1)                      # no run id (older format)
    save_checkpoint(tmp_path, 2, engine.chunks, keep_last=1, run_id="other")
    for step in (3, 4, 5):
        save_checkpoint(tmp_path, step, engine.chunks, keep_last=2, run_id="mine")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001", "step_0000002", "step_0000004",
                                                            "step_0000005"]
    assert read_meta(tmp_path / "step_0000005")["run_id"] == "mine"
    with pytest.raises(CheckpointError, match="step_0000002 was written by another run"):
        save_checkpoint(tmp_path, 2, engine.chunks, run_id="mine")
    assert read_meta(tmp_path / "step_0000002")["run_id"] == "other"
    save_checkpoint(tmp_path, 5, engine.chunks, keep_last=2, run_id="mine")        # its own step: replaced
    assert (tmp_path / "latest").read_text().strip() == "step_0000005"


def test_missing_checkpoint_named(engine, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", engine.chunks)


def test_heads_are_saved_and_loaded_under_their_keys(mp, tmp_path):
    """Heads are children of the GPTModel: a checkpoint holds them as value_head.* / ilql_heads.*
    next to the GPT's own keys (as checkpoints written before have them), and loads them back."""
    from megatron.core import dist_checkpointing

    from nemo_rlhf.models.heads import attach_ilql_heads, attach_value_head

    def heads(gpt):
        attach_value_head(gpt, gpt.config.hidden_size)
        attach_ilql_heads(gpt, two_qs=False)

    torch.manual_seed(0)
    engine = MegatronEngine(ModelConfig(), ParallelConfig(), OptimConfig(), vocab_size=20, max_steps=10, setup=heads)
    with torch.no_grad():
        engine.module.value_head.linear.weight.normal_()
    path = save_checkpoint(tmp_path, 1, engine.chunks)
    keys = set(dist_checkpointing.load_tensors_metadata(str(path)))
    assert {"value_head.linear.weight", "ilql_heads.q_heads.0.weight", "ilql_heads.target_q_heads.0.weight",
            "ilql_heads.v_head.bias", "embedding.word_embeddings.weight"} <= keys
    saved = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    load_checkpoint(path, engine.chunks)
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, saved[n]), n
