"""Reward-model training as a LightningModule: Bradley-Terry loss on preference pairs with a
scalar head (``value_head``) on a megatron GPT, evaluated by held-out pairwise accuracy."""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Dict

import torch

from nemo_rlhf.algorithms.dpo import bradley_terry_loss
from nemo_rlhf.config.schema import RunConfig
from nemo_rlhf.data.preference import PreferenceDataset
from nemo_rlhf.logging import get_logger
from nemo_rlhf.models.gpt import gpt_forward, unwrap
from nemo_rlhf.models.heads import DecoderStates, attach_value_head, has_head, value_head_output
from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_with_states
from nemo_rlhf.modules.forward_only import lm_across_stages
from nemo_rlhf.modules.loop import dp_loader, end_of_step, record_eval, save_engine, TrainingSystem
from nemo_rlhf.modules.run_dir import RunDirectory

log = get_logger(__name__)


def _last_completion_values(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[N, S] -> [N]: the head's output at the last completion token (label t is token t + 1, so the
    last completion token sits at the input position of the last 1 of ``loss_mask``)."""
    s = loss_mask.shape[-1]
    last = (loss_mask * torch.arange(s, device=loss_mask.device)).argmax(-1)
    return values.gather(1, last[:, None]).squeeze(1)


def pair_rewards(model, tokens, loss_mask) -> torch.Tensor:
    """[b, 2, S] -> rewards [b, 2]: the head's output at the last completion token (where the
    input holds the whole prompt + completion, as RewardModelScorer reads samples); forward only,
    across pipeline stages (every rank gets the rewards)."""
    b, two, s = tokens.shape
    _, values = lm_across_stages(model, tokens.reshape(b * two, s), None, None, value_head_output)
    return _last_completion_values(values, loss_mask.reshape(b * two, s)).view(b, two)


def rm_forward(batch, model, margin: float, pack: bool = False):
    """Megatron forward step: rewards [b, 2] and the loss on the last pipeline stage (a stage before
    it returns its hidden states for the schedule to send on). ``pack`` (data.packing): the chosen
    and rejected sequences packed into fewer rows for the forward."""
    b, two, s = batch["tokens"].shape
    flat = batch["tokens"].reshape(b * two, s)
    gpt = unwrap(model)
    if pack:
        _, states = lm_forward_with_states(model, flat, None, batch["loss_mask"].reshape(b * two, s), pack=True)
        if not has_head(gpt):            # a stage before the last: its (packed) hidden states go on
            return states.hidden, None
    else:
        out, hidden = gpt_forward(gpt, flat, torch.arange(s, device=flat.device).expand_as(flat), None)
        if not has_head(gpt):
            return out, None
        states = DecoderStates(hidden)
    values = value_head_output(gpt, states)                                     # [2b, S]
    rewards = _last_completion_values(values, batch["loss_mask"].reshape(b * two, s)).view(b, two)
    return rewards, partial(rm_loss_func, margin)


def rm_loss_func(margin: float, rewards):
    losses, correct = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margin)
    n = torch.tensor(float(rewards.shape[0]))
    pair = lambda x: torch.stack([x.detach().sum().double(), n.double()])
    return losses.sum(), n.to(torch.int), {"loss": pair(losses), "accuracy": pair(correct),
                                           "reward_margin": pair(rewards[:, 0] - rewards[:, 1])}


class RewardModelModule(TrainingSystem):
    def __init__(self, cfg: RunConfig, train_set: PreferenceDataset, heldout: PreferenceDataset, vocab_size: int,
                 run_dir: RunDirectory, dp_rank: int, dp_size: int, config_yaml: str = "",
                 heldout_equal_length: PreferenceDataset = None):
        super().__init__()
        self.cfg, self.train_set, self.heldout, self.run_dir = cfg, train_set, heldout, run_dir
        self.heldout_equal_length = heldout_equal_length
        self.dp_rank, self.dp_size, self.config_yaml = dp_rank, dp_size, config_yaml
        self.engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, vocab_size, cfg.trainer.max_steps,
                                     setup=lambda gpt: attach_value_head(gpt, cfg.model.hidden_size))
        self.chunks = torch.nn.ModuleList(self.engine.chunks)

    def train_dataloader(self):
        return dp_loader(self.train_set, self)

    def training_step(self, batch, batch_idx):
        stats = self.engine.train_step(batch, self.cfg.trainer.micro_batch_size,
                                       partial(rm_forward, margin=self.cfg.rm.margin, pack=self.cfg.data.packing))
        self.step += 1
        end_of_step(self, stats)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        model = self.engine.stages
        for chunk in model:
            chunk.eval()
        accuracy, margin, n = self._pairwise(model, self.heldout)
        metrics = {"accuracy": accuracy, "reward_margin": margin, "heldout_pairs": n}
        if self.heldout_equal_length is not None:   # valid vs invalid-edge walks of the same length
            metrics["accuracy_equal_length"], metrics["reward_margin_equal_length"], _ = \
                self._pairwise(model, self.heldout_equal_length)
        for chunk in model:
            chunk.train()
        return record_eval(self, metrics, t0)

    @staticmethod
    def _pairwise(model, pairs: PreferenceDataset):
        """(share of pairs whose chosen completion scores higher, mean margin, pairs)."""
        correct, margins, n = 0.0, 0.0, 0
        for i in range(0, len(pairs), 256):
            r = pair_rewards(model, pairs.tokens[i:i + 256], pairs.loss_mask[i:i + 256])
            correct += float((r[:, 0] > r[:, 1]).sum())
            margins += float((r[:, 0] - r[:, 1]).sum())
            n += r.shape[0]
        return correct / n, margins / n, n

    def save(self):
        save_engine(self, self.engine)
