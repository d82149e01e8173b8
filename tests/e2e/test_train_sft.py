"""End-to-end: the real entry point (python -m nemo_rlhf.train) with overrides, asserting on the
run directory it writes."""
import json
import shutil

import pytest

from tests.conftest import torchrun, train

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_sft_tiny_learns_valid_walks(tmp_path):
    run = tmp_path / "sft"
    proc = _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false"]))
    summary = json.loads((run / "summary.json").read_text())
    init, final = summary["initial"], summary["final"]
    assert init["valid_rate"] < 0.2                     # random init: junk
    assert final["valid_rate"] >= 0.95                  # the bar
    assert final["valid_rate_greedy"] >= 0.95
    assert 0.2 < final["optimality"] < 0.6              # imitates random walks (~0.34), no better
    assert summary["steps"] == 1000
    # the run-directory contract
    assert (run / "config.yaml").read_text().count("tensor_model_parallel_size") == 1
    assert (run / "checkpoints" / "step_0001000" / "nemo_rlhf_meta.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0001000"
    assert len([p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]) == 2  # keep_last
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "csv" / "metrics.csv").is_file()
    losses = _losses(run)
    assert losses[0][1] > 1.5 and losses[-1][1] < 0.8
    # what the user is told to look at
    assert "valid_rate" in proc.stdout and "before" in proc.stdout and "after" in proc.stdout


def test_resume_continues_the_same_loss_sequence(tmp_path):
    common = ["trainer.max_steps=60", "trainer.checkpoint_every_n_steps=20", "trainer.log_every_n_steps=1",
              "trainer.eval_every_n_steps=30", "trainer.keep_last_n_checkpoints=5", "trainer.progress_bar=false",
              "task.eval_samples_per_start=4"]
    full = tmp_path / "full"
    _ok(train([f"hydra.run.dir={full}", *common]))
    # an interrupted run: the same run directory as it stood after the step-20 checkpoint
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for step in (40, 60):
        shutil.rmtree(cut / "checkpoints" / f"step_{step:07d}")
    proc = _ok(train([f"hydra.run.dir={cut}", *common, "resume=auto"]))
    assert "resumed from" in proc.stderr and "at step 20" in proc.stderr
    a, b = _losses(full), _losses(cut)
    assert [s for s, _ in b] == list(range(1, 61))      # no duplicated or missing steps
    assert b == a                                       # bit-identical loss sequence
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, cut))
    assert sa["initial"] == sb["initial"]
    assert {k: v for k, v in sa["final"].items() if k != "eval_time_s"} == \
           {k: v for k, v in sb["final"].items() if k != "eval_time_s"}


def test_missing_resume_checkpoint_is_named(tmp_path):
    proc = train([f"hydra.run.dir={tmp_path / 'r'}", f"resume={tmp_path / 'nope'}"])
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "no such checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def _hf_gpt2(path, num_layers):
    """gpt_tiny's width (64, 4 heads, 16 positions) as a random-weight HF GPT-2 with the randomwalks
    character tokenizer next to it."""
    import torch
    import transformers

    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    tok = CharTokenizer(RandomWalks().vocab)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=num_layers, n_embd=64, n_head=4, n_positions=16, vocab_size=tok.vocab_size,
                                  bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    tok.save_hf(path)
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["parallel=tp2"], ["parallel=single"], ["parallel=tp2_sp"],
                                    ["parallel=pp2_vpp2", "model.num_layers=4"]],
                         ids=["tp2", "dp2", "tp2_sp", "pp2_vpp2"])
def test_two_rank_training_matches_single_process(tmp_path, layout):
    """Through Lightning + the Megatron strategy: TP=2 / DP=2 / TP=2+SP / PP=2 x VPP=2 (interleaved
    schedule, 4 layers in 4 chunks) give the single-process loss sequence (every TP rank sees the same
    batch; DP ranks split it). The interleaved run also resumes from its mid-run checkpoint with the
    same losses."""
    interleaved = layout[0] == "parallel=pp2_vpp2"
    model = [o for o in layout if o.startswith("model.")]          # the architecture: both runs
    if interleaved:
        # random initialisation draws each pipeline stage's layers from its own RNG stream, so a PP run
        # starts from other weights than PP=1: both start from one (4-layer GPT-2) Hugging Face model
        model.append(f"model.path={_hf_gpt2(tmp_path / 'hf', num_layers=4)}")
    steps = 10 if interleaved else 30                                  # 3 launches: keep them short
    common = [f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "trainer.eval_every_n_steps=0",
              f"trainer.checkpoint_every_n_steps={steps // 2 if interleaved else 0}", "trainer.progress_bar=false",
              "task.eval_samples_per_start=4", *model]
    single = tmp_path / "single"
    _ok(train([f"hydra.run.dir={single}", *common]))
    multi = tmp_path / "multi"
    launch = lambda run, *extra: _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "sft_tiny",
                                               f"hydra.run.dir={run}", *common, *layout, *extra]))
    launch(multi)
    a, b = _losses(single), _losses(multi)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2
    expected = {"parallel=tp2": (2, 1, 1), "parallel=single": (1, 2, 1), "parallel=tp2_sp": (2, 1, 1),
                "parallel=pp2_vpp2": (1, 1, 2)}[layout[0]]
    assert (summary["layout"]["tp"], summary["layout"]["dp"], summary["layout"]["pp"]) == expected
    if layout[0] in ("parallel=single", "parallel=pp2_vpp2"):
        # DP=2: each rank evaluates half the chunks; PP=2 x VPP=2: sampled round the ring; the same numbers
        drop = lambda m: {k: v for k, v in m.items() if k != "eval_time_s"}
        single_summary = json.loads((single / "summary.json").read_text())
        assert drop(summary["initial"]) == drop(single_summary["initial"])
    if interleaved:   # cut after the mid-run checkpoint, resume at PP=2 x VPP=2
        cut = tmp_path / "cut"
        shutil.copytree(multi, cut)
        shutil.rmtree(cut / "checkpoints" / f"step_{steps:07d}")
        proc = launch(cut, "resume=auto")
        assert f"at step {steps // 2}" in proc.stderr + proc.stdout
        assert _losses(cut) == b                              # the same losses, none repeated or missing


@pytest.mark.distributed
def test_pp2_run_evaluates_like_the_single_process_run(tmp_path):
    """PP=2 without virtual stages: the task evaluation samples across the two stages and reports
    what the single-process run reports (both start from one Hugging Face model)."""
    common = ["trainer.max_steps=10", "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=0",
              "trainer.progress_bar=false", "task.eval_samples_per_start=4",
              f"model.path={_hf_gpt2(tmp_path / 'hf', num_layers=2)}"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    _ok(train([f"hydra.run.dir={single}", *common]))
    _ok(torchrun(["-m", "nemo_rlhf.train", "--config-name", "sft_tiny", f"hydra.run.dir={multi}", *common,
                  "parallel=pp2"]))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (single, multi))
    assert b["layout"]["pp"] == 2
    for stage in ("initial", "final"):
        for key in ("optimality_greedy", "valid_rate_greedy", "length_greedy"):
            assert b[stage][key] == a[stage][key], (stage, key)
        for key in ("optimality", "valid_rate"):
            assert abs(b[stage][key] - a[stage][key]) < 0.02, (stage, key)


def test_weights_and_biases_offline_logger(tmp_path):
    """logger=wandb-style logging with no account and no network: an offline W&B run under the run
    directory holding the train records (`wandb sync` uploads it later)."""
    run = tmp_path / "wb"
    _ok(train([f"hydra.run.dir={run}", "trainer.max_steps=5", "trainer.log_every_n_steps=1",
               "trainer.eval_every_n_steps=0", "trainer.progress_bar=false", "logger.wandb=true"],
              env={"WANDB_SILENT": "true"}))
    runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"train/loss" in runs[0].read_bytes()
    proc = train([f"hydra.run.dir={tmp_path / 'bad'}", "logger.wandb_mode=cloud"])
    assert proc.returncode == 2 and "logger.wandb_mode must be offline|online" in proc.stderr
