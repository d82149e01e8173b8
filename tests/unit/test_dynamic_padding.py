"""Dynamic padding: the engine cuts each batch's padded tail before the forward; the losses, stats
and gradients equal those of the full model.seq_length width."""
import torch

from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
from nemo_rlhf.data.preference import PreferenceDataset, randomwalk_pairs
from nemo_rlhf.data.tokenizers import CharTokenizer
from nemo_rlhf.modules.engine import MegatronEngine, trim_right_padding
from nemo_rlhf.recipes.dpo import DPOConfig
from nemo_rlhf.tasks.randomwalks import RandomWalks


def test_trim_cuts_after_the_last_loss_position_rounded_up():
    mask = torch.zeros(2, 2, 40)
    mask[0, 1, 3:11] = 1                                    # last loss position 10 -> keep 12 -> 16
    batch = {"tokens": torch.ones(2, 2, 40, dtype=torch.long), "loss_mask": mask, "ref_logps": torch.zeros(2, 2)}
    out = trim_right_padding(batch, 8)
    assert out["tokens"].shape == (2, 2, 16) and out["loss_mask"].sum() == 8 and out["ref_logps"].shape == (2, 2)
    assert trim_right_padding(batch, 48)["tokens"].shape[-1] == 40          # never wider than the batch
    mask[1, 0, 39] = 1
    assert trim_right_padding(batch, 8)["tokens"].shape[-1] == 40           # a full row: nothing to cut


def test_a_dpo_step_on_trimmed_batches_equals_the_full_width_step(mp):
    from nemo_rlhf.modules.dpo import dpo_forward_backward

    task = RandomWalks()
    tok = CharTokenizer(task.vocab)
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64)
    data = PreferenceDataset.build(randomwalk_pairs(task, tok, 8, seed=0), model.seq_length, tok.pad_id, tok.eos_id)
    batch = {"tokens": data.tokens, "labels": data.labels, "loss_mask": data.loss_mask, "ref_logps": data.ref_logps}
    assert trim_right_padding(batch)["tokens"].shape[-1] == 16              # walks of <= 11 tokens
    assert trim_right_padding(batch, 1)["tokens"].shape[-1] < 16
    results = []
    for trim in (True, False):
        torch.manual_seed(0)
        engine = MegatronEngine(model, ParallelConfig(), OptimConfig(), tok.vocab_size, max_steps=2)
        engine.trim_padding = trim
        stats = dpo_forward_backward(engine, batch, 4, DPOConfig(beta=0.5, reference="model"),
                                     reference=engine.module)
        grads = torch.cat([p.main_grad.flatten() for p in engine.module.parameters()])
        results.append((stats, grads))
    (trimmed, g1), (full, g2) = results
    assert trimmed["num_tokens"] == full["num_tokens"] > 0
    for key in ("loss", "rewards/margin", "logps/chosen", "logps/rejected"):
        assert abs(trimmed[key] - full[key]) < 1e-5, key
    assert float((g1 - g2).abs().max()) < 1e-6 and float(g1.norm()) > 1e-3
