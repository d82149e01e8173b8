import torch

from nemo_rlhf.checkpoint import save_checkpoint
from nemo_rlhf.config.schema import ModelConfig, ParallelConfig
from nemo_rlhf.data.tokenizers import CharTokenizer
from nemo_rlhf.models.gpt import build_gpt_chunks
from nemo_rlhf.models.heads import attach_value_head, value_head_output
from nemo_rlhf.rewards import RewardModelScorer, score


def test_reward_model_scores_the_last_token(mp, tmp_path):
    tok = CharTokenizer(list("abcdef"))
    cfg = ModelConfig()
    torch.manual_seed(0)
    rm = build_gpt_chunks(cfg, ParallelConfig(), tok.vocab_size)[0].eval()
    attach_value_head(rm, cfg.hidden_size)
    torch.nn.init.normal_(rm.value_head.linear.weight, std=1.0)
    path = save_checkpoint(tmp_path, 1, [rm])
    scorer = RewardModelScorer(path, cfg, ParallelConfig(), tok)
    samples = ["abc", "b", "fedcba"]
    got = score(scorer, samples, [s[0] for s in samples], [s[1:] for s in samples])
    with torch.no_grad():
        for s, g in zip(samples, got):
            ids = torch.tensor([tok.encode(s)])
            rm(ids, torch.arange(ids.shape[1])[None], None)
            assert abs(value_head_output(rm)[0, -1].item() - g) < 1e-5
    assert len({round(g, 4) for g in got}) == 3
