"""Multi-rank parallel-layout checks, run by tests/distributed/test_parallel.py in ONE torchrun
launch (2 ranks, gloo, CPU): ``torchrun --nproc-per-node 2 tests/distributed/parallel_checks.py OUT.json``.

Every check compares a parallel layout against the single-process (TP=1, PP=1, DP=1) result
computed on each rank from the same weights and the same batch of randomwalks data:
  tp2        TP=2: logits, loss, gradients, parameters after one optimizer step
  tp2_sp     TP=2 with sequence parallel: loss, gradients, parameters after one step
  pp2        PP=2 (1F1B, 2 micro-batches): loss, gradients, parameters after one step
  chunked_logits_{tp1,tp2,tp2_sp,pp2}  model.logits_chunk_tokens (output layer and vocab-parallel
             cross-entropy a chunk of tokens at a time): loss, gradients, parameters after one step
             equal the single process computing all logits at once
  pp2_vpp2   PP=2 with 2 virtual chunks per stage (interleaved 1F1B, 4 layers, 4 micro-batches):
             the same, against a 4-layer single process; dpo_pp2_vpp2: a DPO step there (2
             sequences per pair in each micro-batch)
  dp2        DP=2 (each rank half the batch): loss, gradients, parameters after one step,
             replicas identical
  dp2_reductions  PPO's advantage whitening and running reward moments at DP=2 (each rank half the
             rows, statistics reduced over the DP group) equal those of the whole batch, on every rank
  dp2_distopt  DP=2 with the distributed optimizer: the same
  ckpt_tp2_to_tp1 / ckpt_tp1_to_tp2  dist checkpoint saved at one TP, loaded at the other
  gen_tp2    greedy KV-cached generation at TP=2 equals TP=1
  gen_pp2 / gen_pp2_vpp2  greedy generation across 2 pipeline stages (x 2 virtual chunks, 4 layers)
             equals PP=1 on every rank
  hf_tp2 / hf_pp2  Hugging Face models imported / exported at TP=2 and PP=2 (hf_checks.py)
  t5_tp2     T5 (model.arch=t5): logits, SFT loss, grads and greedy KV-cached decoding at TP=2 equal
             TP=1 (and the cached decoding equals re-running the decoder)
  t5_hf_*    Hugging Face T5 (v1.0, v1.1/flan) imported at TP=2: logits equal transformers; exported
             from TP=2, transformers reloads it with our logits
  dpo_* / kto_*  a DPO / KTO step at TP=2, PP=2 and DP=2 (micro-batches of 1) equals TP=1 (KTO's
             reference point z0 comes from the whole global batch, whatever the split)
  fwd_pp2 / fwd_pp2_vpp2  the forward-only pass of the experience / scoring (NLL and value head) through
             megatron's forward-only schedule in micro-batches of 3 of 8 ragged rows equals PP=1
  {actor,critic,rm,ilql}_{pp2,pp2_vpp2,dp2}  a step of the trainers whose heads sit on the last
             pipeline stage (PPO's actor with a value head, PPO's separate critic, the reward model,
             ILQL) at PP=2, PP=2 x VPP=2 and DP=2 (each rank half the rows, micro-batches of one)
             equals the single-process step (4-layer model); gradients of every stage are gathered
             over the pipeline group
Every rank computes every check on its own parameters; the results of all ranks are gathered and
merged (worst difference over the ranks, an error on any rank fails the check, ``ranks_agree``),
and rank 0 writes {check: {metric: value}} to OUT.json; the pytest side asserts on the numbers.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial

import torch
import torch.distributed as dist

from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
from nemo_rlhf.data.sft import SFTDataset
from nemo_rlhf.data.tokenizers import CharTokenizer
from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_step
from nemo_rlhf.modules.sft import sft_loss_func
from nemo_rlhf.parallel import init_distributed
from nemo_rlhf.parallel import initialize_model_parallel as _initialize_model_parallel
from nemo_rlhf.recipes.dpo import DPOConfig
from nemo_rlhf.recipes.ilql import ILQLConfig
from nemo_rlhf.recipes.kto import KTOConfig
from nemo_rlhf.recipes.ppo import PPOConfig
from nemo_rlhf.tasks.randomwalks import RandomWalks

MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=16)
MODEL4 = dataclasses.replace(MODEL, num_layers=4)   # 4 layers: PP=2 x VPP=2 gives each chunk one
# SGD: the parameter update is lr * grad, so "params after one step" compares the whole step
# (DDP reduce, finalize, optimizer) without Adam's g / sqrt(v) amplifying 1e-8 noise in tiny grads.
OPTIM = OptimConfig(name="sgd", lr=0.5, clip_grad=0.0)
CHECK_DEADLINE_S = 300   # per check, on both ranks: the slowest takes ~10 s on a loaded 2-core machine
BATCH = 8
# step stats that are counts, not results: they differ with the layout (at TP=1 on two ranks both
# data-parallel replicas see the whole batch, so the counts double)
COUNTS = ("num_tokens", "model_tokens")
T5_MODEL = dataclasses.replace(MODEL, arch="t5", encoder_num_layers=1)
PPO = PPOConfig(cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)
# GRPO's loss knobs that depend on how a batch is split: per-sequence means, a k3 KL term, DAPO's clip-higher
GRPO = PPOConfig(advantage_estimator="grpo", critic="none", num_generations=4, cliprange_high=0.28,
                 kl_loss_coef=0.1, loss_aggregation="seq_mean_token_mean")
DPO = DPOConfig(beta=0.1)
KTO = KTOConfig(beta=0.1)


def initialize_model_parallel(parallel, seed):
    """megatron's parallel state for the next check, after destroying the previous check's groups:
    megatron's destroy_model_parallel only forgets them, and the ~20 gloo groups each of the ~55
    checks created kept their sockets and threads (the launch took 7 minutes, mostly in the kernel,
    and over 15 with megatron-core 0.19). The checks build fresh models after each call."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        seen = set()
        for name, value in list(vars(ps).items()):
            if name.startswith("_") and isinstance(value, dist.ProcessGroup) and value is not dist.group.WORLD \
                    and id(value) not in seen:
                seen.add(id(value))
                dist.destroy_process_group(value)
        ps.destroy_model_parallel()
    return _initialize_model_parallel(parallel, seed=seed)


def data():
    task = RandomWalks(seed=1000)
    tok = CharTokenizer(task.vocab)
    pairs = [([tok.ids[task.walk_text(w[:1])]], tok.encode(task.walk_text(w[1:]))) for w in task.walks[:BATCH]]
    ds = SFTDataset.from_pairs(pairs, MODEL.seq_length, tok.pad_id, tok.eos_id)
    return {"tokens": ds.tokens, "labels": ds.labels, "loss_mask": ds.loss_mask}, tok


def engine_for(parallel: ParallelConfig, vocab: int, seed: int = 7, optim: OptimConfig = OPTIM) -> MegatronEngine:
    initialize_model_parallel(parallel, seed=seed)
    torch.manual_seed(seed)
    return MegatronEngine(MODEL, parallel, optim, vocab, max_steps=10)


def named_params(engine: MegatronEngine, model: ModelConfig = None):
    """(name in the single-process model, param) for this rank's chunks (of a ``model``-shaped GPT,
    default MODEL)."""
    from megatron.core import parallel_state as ps

    from nemo_rlhf.models.gpt import unwrap

    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    per_chunk = (model or MODEL).num_layers // (pp * len(engine.chunks))
    for v, chunk in enumerate(engine.chunks):
        for name, p in unwrap(chunk).named_parameters():
            if name.startswith("decoder.layers."):
                # interleaved: virtual chunk v of stage r holds layers (v * pp + r) * per_chunk + i
                parts = name.split(".")
                parts[2] = str(int(parts[2]) + (v * pp + pp_rank) * per_chunk)
                name = ".".join(parts)
            if name == "output_layer.weight":  # tied: the last stage's copy of the embedding
                name = "embedding.word_embeddings.weight"
            yield name, p


def tp_full(p: torch.Tensor, param) -> torch.Tensor:
    """Gather a tensor-parallel shard along its partition dim."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return p.detach().clone()
    parts = [torch.empty_like(p) for _ in range(tp)]
    dist.all_gather(parts, p.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def load_reference_weights(engine: MegatronEngine, ref_params, model: ModelConfig = None):
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in named_params(engine, model):
            full = ref_params[name]
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                full = full.chunk(tp, dim=p.partition_dim)[rank]
            p.copy_(full)
    # the distributed / fp32 optimizer keeps its own main-param copies: rebuild them
    engine.optimizer.reload_model_params()


def compare(engine, ref_params, ref_grads, ref_after):
    """Max abs differences of grads (before the step must have been taken) are measured by the
    caller; this compares parameters after the step."""
    worst = 0.0
    for name, p in named_params(engine):
        worst = max(worst, float((tp_full(p, p) - ref_after[name]).abs().max()))
    return worst


def grad_diff(engine, ref_grads):
    worst = 0.0
    for name, p in named_params(engine):
        g = tp_full(p.main_grad, p)
        worst = max(worst, float((g - ref_grads[name]).abs().max()))
    return worst


def run_layout(parallel, vocab, batch, ref, dp_split=False, mbs=None):
    engine = engine_for(parallel, vocab)
    load_reference_weights(engine, ref["params"])
    local = batch
    if dp_split:
        from megatron.core import parallel_state as ps

        r, n = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        size = BATCH // n
        local = {k: v[r * size:(r + 1) * size] for k, v in batch.items()}
    stats = engine.forward_backward(local, mbs or local["tokens"].shape[0],
                                    partial(lm_forward_step, loss_fn=sft_loss_func))
    out = {"loss_diff": abs(stats["loss"] - ref["loss"]), "loss": stats["loss"], "ref_loss": ref["loss"],
           "grad_max_abs_diff": grad_diff(engine, ref["grads"])}
    engine.optimizer_step()
    out["param_after_step_max_abs_diff"] = compare(engine, ref["params"], ref["grads"], ref["after"])
    return engine, out


def reference(vocab, batch):
    """Single-process result: TP=PP=1; each rank computes it alone on the full batch."""
    from nemo_rlhf.models.gpt import build_gpt_chunks

    engine = engine_for(ParallelConfig(), vocab)
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    # plain autograd on an unwrapped copy (megatron DDP routes grads to main_grad buffers)
    model = build_gpt_chunks(MODEL, ParallelConfig(), vocab)[0]
    model.load_state_dict(engine.module.state_dict())
    tokens = batch["tokens"]
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, pos, None).detach()
    nll = model(tokens, pos, None, labels=batch["labels"])
    loss = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    # one step of the same megatron optimizer on those grads (via the engine, DP replicas agree)
    stats = engine.forward_backward(batch, BATCH, partial(lm_forward_step, loss_fn=sft_loss_func))
    engine.optimizer_step()
    after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    second = engine.forward_backward(batch, BATCH, partial(lm_forward_step, loss_fn=sft_loss_func),
                                     forward_only=True)
    return {"params": params, "grads": grads, "after": after, "loss": float(loss), "logits": logits,
            "engine_loss": stats["loss"], "loss_after_step": second["loss"]}


def greedy(engine, tok, n=9, use_kv_cache=True):
    from nemo_rlhf.generation.sampling import SamplingParams, generate

    prompts = torch.tensor([[tok.ids[c]] for c in "bcdefghijk"])
    return generate(engine.stages, prompts, SamplingParams(max_new_tokens=n, greedy=True, eos_id=tok.eos_id,
                                                           use_kv_cache=use_kv_cache),
                    vocab_size=tok.vocab_size)


def greedy_nocache(engine, tok):
    return greedy(engine, tok, use_kv_cache=False)


def greedy_ragged(engine, tok, use_kv_cache=True):
    """Greedy decoding of left-padded prompts of three lengths (padding masked, positions per prompt)."""
    from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad

    ids, lengths = left_pad([[tok.ids[c] for c in text] for text in ("b", "cde", "fg", "hijk")], tok.pad_id)
    return generate(engine.stages, ids, SamplingParams(max_new_tokens=7, greedy=True, eos_id=tok.eos_id,
                                                       pad_id=tok.pad_id, use_kv_cache=use_kv_cache),
                    vocab_size=tok.vocab_size, prompt_lengths=lengths)


def main(out_path):
    init_distributed()
    rank = dist.get_rank()
    batch, tok = data()
    vocab = tok.vocab_size
    results = {}

    only = [p for p in os.environ.get("PARALLEL_CHECKS", "").split(",") if p]   # developers: a subset by prefix

    def check(name, fn):
        if only and not any(name.startswith(p) for p in only):
            return
        start = time.perf_counter()
        # A check takes seconds; one stuck (a collective one rank never reaches) prints every
        # thread's stack and ends the launch instead of waiting out the test's timeout.
        faulthandler.dump_traceback_later(CHECK_DEADLINE_S, exit=True)
        try:
            results[name] = fn()
        except Exception as e:  # report, keep going with the other checks
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            # now, not only in OUT.json: the other rank may be left waiting in a collective
            print(f"[rank {rank}] {name} failed:\n{results[name]['trace']}", file=sys.stderr, flush=True)
        finally:
            faulthandler.cancel_dump_traceback_later()
        print(f"[rank {rank}] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    ref = reference(vocab, batch)
    results["reference"] = {"loss": ref["loss"], "engine_loss_diff": abs(ref["engine_loss"] - ref["loss"]),
                            "loss_after_step": ref["loss_after_step"]}

    def tp2():
        engine, out = run_layout(ParallelConfig(tensor_model_parallel_size=2), vocab, batch, ref)
        return out

    def tp2_logits():
        engine = engine_for(ParallelConfig(tensor_model_parallel_size=2), vocab)
        load_reference_weights(engine, ref["params"])
        tokens = batch["tokens"]
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = engine.module(tokens, pos, None, runtime_gather_output=True)
        return {"logits_max_abs_diff": float((logits - ref["logits"]).abs().max())}

    def tp2_sp():
        _, out = run_layout(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), vocab, batch, ref)
        return out

    def chunked_logits(parallel, mbs=None):
        """model.logits_chunk_tokens=5 (the output layer and cross-entropy 5 of the 8 x 16 tokens at
        a time, the last chunk short) in ``parallel`` against the single process without chunks."""
        global MODEL
        import nemo_rlhf.models.gpt as gpt_module

        whole, real, calls = MODEL, gpt_module.chunked_nll, []

        def counted(*args, **kwargs):     # the real function, counted: the path was taken
            calls.append(args[0].shape[0])
            return real(*args, **kwargs)

        MODEL, gpt_module.chunked_nll = dataclasses.replace(whole, logits_chunk_tokens=5), counted
        try:
            _, out = run_layout(parallel, vocab, batch, ref, mbs=mbs)
            counts = [None] * dist.get_world_size()
            dist.all_gather_object(counts, sum(calls))
            out["chunked_tokens_by_rank"] = counts
            return out
        finally:
            MODEL, gpt_module.chunked_nll = whole, real

    def pp2():
        _, out = run_layout(ParallelConfig(pipeline_model_parallel_size=2), vocab, batch, ref, mbs=BATCH // 2)
        return out

    def pp2_vpp2():
        """Interleaved 1F1B: 4 layers as 2 stages x 2 virtual chunks, 4 micro-batches (2 groups of
        PP per chunk: the case that once drifted by 0.0074), against a 4-layer single process."""
        global MODEL
        from nemo_rlhf.models.gpt import unwrap

        two_layers = MODEL
        MODEL = dataclasses.replace(two_layers, num_layers=4)
        try:
            ref4 = reference(vocab, batch)
            vpp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
            engine, out = run_layout(vpp, vocab, batch, ref4, mbs=BATCH // 4)
            out["chunks"] = len(engine.chunks)
            out["layers_per_chunk"] = [len(unwrap(c).decoder.layers) for c in engine.chunks]
            return out
        finally:
            MODEL = two_layers

    def dpo_pp2_vpp2():
        """One DPO step at PP=2 x VPP=2 (a micro-batch feeds 2 sequences per pair to the model:
        the interleaved schedule's fixed activation shape must count them) against PP=1, 4 layers."""
        global MODEL
        from nemo_rlhf.data.preference import PreferenceDataset, randomwalk_pairs
        from nemo_rlhf.modules.dpo import dpo_forward

        two_layers = MODEL
        MODEL = dataclasses.replace(two_layers, num_layers=4)
        try:
            pairs = randomwalk_pairs(RandomWalks(seed=1000), tok, 4, seed=0)
            ds = PreferenceDataset.build(pairs, MODEL.seq_length, tok.pad_id, tok.eos_id)
            g = torch.Generator().manual_seed(5)
            pbatch = {"tokens": ds.tokens, "labels": ds.labels, "loss_mask": ds.loss_mask,
                      "ref_logps": -6 + torch.randn(len(ds), 2, generator=g)}
            step = partial(dpo_forward, cfg=DPO)
            single = engine_for(ParallelConfig(), vocab)
            params4 = {n: p.detach().clone() for n, p in named_params(single)}
            base = single.forward_backward(pbatch, 4, step)
            base_grads = {n: p.main_grad.detach().clone() for n, p in named_params(single)}
            engine = engine_for(ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
                                vocab)
            load_reference_weights(engine, params4)
            stats = engine.forward_backward(pbatch, 1, step)          # 4 micro-batches of 1 pair
            return {"max_stat_abs_diff": max(abs(stats[k] - base[k]) for k in base if k not in COUNTS),
                    "grad_max_abs_diff": max(float((p.main_grad - base_grads[n]).abs().max())
                                             for n, p in named_params(engine)),
                    "loss": stats["loss"]}
        finally:
            MODEL = two_layers

    def dp2():
        engine, out = run_layout(ParallelConfig(), vocab, batch, ref, dp_split=True)
        p = torch.cat([q.detach().flatten() for _, q in named_params(engine)])
        other = p.clone()
        dist.broadcast(other, src=0)
        out["replica_max_abs_diff"] = float((p - other).abs().max())
        return out

    def dp2_reductions():
        """PPO's whitening (sums reduced over DP) and running moments (Chan-combined over DP) of each
        rank's half of the rows against the whole batch on one rank; each rank reports its own."""
        from megatron.core import parallel_state as ps

        from nemo_rlhf.algorithms.ppo import whiten
        from nemo_rlhf.algorithms.reductions import INITIAL_MOMENTS, moments, update_moments
        from nemo_rlhf.parallel.reductions import data_parallel_group, dp_moments, dp_whiten

        initialize_model_parallel(ParallelConfig(), seed=7)
        group = data_parallel_group()
        r, n = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        g = torch.Generator().manual_seed(13)
        x = 0.5 + 2 * torch.randn(BATCH, 6, generator=g)
        mask = (torch.rand(BATCH, 6, generator=g) > 0.3).float()
        scores = [3 + torch.randn(BATCH, generator=g), -1 + 2 * torch.randn(BATCH, generator=g)]
        rows = slice(r * BATCH // n, (r + 1) * BATCH // n)
        whole = whiten(x, mask)
        state, state_dp = INITIAL_MOMENTS, INITIAL_MOMENTS
        for s in scores:                 # two PPO iterations of scale_reward=running
            state = update_moments(state, moments(s))
            state_dp = update_moments(state_dp, dp_moments(s[rows], group))
        mine = torch.tensor([float((dp_whiten(x[rows], mask[rows], group) - whole[rows]).abs().max()),
                             float((whiten(x[rows], mask[rows]) - whole[rows]).abs().max()),
                             max(abs(a - b) for a, b in zip(state_dp, state))], dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        return {"dp_size": n, "whiten_max_abs_diff": [float(e[0]) for e in every],
                "shard_alone_whiten_max_abs_diff": [float(e[1]) for e in every],
                "moments_max_abs_diff": [float(e[2]) for e in every], "moments": list(state)}

    def dp2_distopt():
        # The distributed optimizer supports Adam only; compare it with the plain megatron Adam
        # at DP=2 (itself checked against the single process in dp2). A large eps keeps Adam's
        # g / (sqrt(v) + eps) from amplifying 1e-8 reduction-order noise in tiny grads.
        adam = OptimConfig(name="adam", lr=1e-2, adam_eps=1e-3, clip_grad=0.0)
        r, n = dist.get_rank(), dist.get_world_size()
        local = {k: v[r * BATCH // n:(r + 1) * BATCH // n] for k, v in batch.items()}
        after = {}
        for distopt in (False, True):
            engine = engine_for(ParallelConfig(use_distributed_optimizer=distopt), vocab, optim=adam)
            load_reference_weights(engine, ref["params"])
            stats = engine.forward_backward(local, BATCH // n, partial(lm_forward_step, loss_fn=sft_loss_func))
            engine.optimizer_step()
            after[distopt] = torch.cat([q.detach().flatten() for _, q in named_params(engine)])
        other = after[True].clone()
        dist.broadcast(other, src=0)
        # (grads are reduce-scattered with the distributed optimizer: each rank's buffer holds
        # only its shard, so the step's result is what is compared)
        return {"loss_diff": abs(stats["loss"] - ref["loss"]),
                "param_after_step_vs_plain_adam_max_abs_diff": float((after[True] - after[False]).abs().max()),
                "moved_max_abs": float((after[True] - torch.cat([ref["params"][k].flatten() for k, _ in named_params(engine)])).abs().max()),
                "replica_max_abs_diff": float((after[True] - other).abs().max())}

    def ckpt_pp2_to_pp1():
        """The documented route to sampling from a PP-trained policy: reshard its checkpoint to PP=1."""
        from nemo_rlhf.checkpoint import load_checkpoint, save_checkpoint

        box = [tempfile.mkdtemp(prefix="ckpt_pp_") if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        saver, _ = run_layout(ParallelConfig(pipeline_model_parallel_size=2), vocab, batch, ref, mbs=BATCH // 2)
        path = save_checkpoint(box[0], 1, saver.chunks)
        loader = engine_for(ParallelConfig(), vocab, seed=99)
        load_checkpoint(path, loader.chunks)
        # the PP=2 step equals the single-process step (pp2 check), so compare with ref["after"]
        after = max(float((p.detach() - ref["after"][n]).abs().max()) for n, p in named_params(loader))
        out = greedy(loader, tok)
        return {"after_load_vs_single_process_step": after, "generates": len(out.tokens)}

    def ckpt(save_tp, load_tp):
        from nemo_rlhf.checkpoint import load_checkpoint, save_checkpoint

        root = tempfile.mkdtemp(prefix="ckpt_") if rank == 0 else None
        box = [root]
        dist.broadcast_object_list(box, src=0)
        root = box[0]
        # Adam (its state is what must reshard), large eps as in dp2_distopt
        adam = OptimConfig(name="adam", lr=1e-2, adam_eps=1e-3, clip_grad=0.0)
        step = partial(lm_forward_step, loss_fn=sft_loss_func)
        # one real step at save_tp (so there is optimizer state), save, then a second step
        saver = engine_for(ParallelConfig(tensor_model_parallel_size=save_tp), vocab, optim=adam)
        load_reference_weights(saver, ref["params"])
        saver.train_step(batch, BATCH, step)
        saved = {n: tp_full(p, p) for n, p in named_params(saver)}
        path = save_checkpoint(root, 1, saver.chunks, saver.optimizer, saver.scheduler, {"note": "x"})
        saver.train_step(batch, BATCH, step)
        second = {n: tp_full(p, p) for n, p in named_params(saver)}
        # load into a differently initialised model at load_tp, and take the same second step
        loader = engine_for(ParallelConfig(tensor_model_parallel_size=load_tp), vocab, seed=99, optim=adam)
        before = max(float((tp_full(p, p) - saved[n]).abs().max()) for n, p in named_params(loader))
        loop = load_checkpoint(path, loader.chunks, loader.optimizer, loader.scheduler)
        after = max(float((tp_full(p, p) - saved[n]).abs().max()) for n, p in named_params(loader))
        loader.train_step(batch, BATCH, step)
        second_diff = max(float((tp_full(p, p) - second[n]).abs().max()) for n, p in named_params(loader))
        moved = max(float((second[n] - saved[n]).abs().max()) for n in saved)
        return {"before_load_max_abs_diff": before, "after_load_max_abs_diff": after, "step": loop["step"],
                "second_step_max_abs_diff": second_diff, "second_step_moved": moved,
                "note": loop.get("note")}

    def gen(tp):
        engine = engine_for(ParallelConfig(tensor_model_parallel_size=tp), vocab)
        load_reference_weights(engine, ref["params"])
        out = greedy(engine, tok)
        nocache = greedy_nocache(engine, tok)
        ragged = greedy_ragged(engine, tok)
        return {"tokens": out.tokens.tolist(), "logprobs": out.logprobs.tolist(),
                "nocache_tokens": nocache.tokens.tolist(), "ragged_tokens": ragged.tokens.tolist(),
                "ragged_logprobs": ragged.logprobs.tolist()}

    def gen_pp2():
        """Greedy decoding across two pipeline stages (KV cache per stage, hidden states sent on,
        the last stage's choice broadcast), on the single-process weights; every rank's sequences."""
        parallel = ParallelConfig(pipeline_model_parallel_size=2)
        initialize_model_parallel(parallel, seed=7)
        engine = engine_for(parallel, vocab)
        load_reference_weights(engine, ref["params"])
        mine = {"tokens": greedy(engine, tok).tokens.tolist(), "logprobs": greedy(engine, tok).logprobs.tolist(),
                "nocache_tokens": greedy_nocache(engine, tok).tokens.tolist(),
                "ragged_tokens": greedy_ragged(engine, tok).tokens.tolist(),
                "ragged_logprobs": greedy_ragged(engine, tok).logprobs.tolist()}
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
        return {"ranks": every}

    def gen_pp2_vpp2():
        """Greedy decoding across 2 stages x 2 virtual chunks (4 layers: the hidden states go round
        the ring twice, rank 1's chunk 0 sends to rank 0's chunk 1) equals PP=1 on the same 4-layer
        weights; every rank's sequences."""
        global MODEL
        two_layers = MODEL
        MODEL = MODEL4
        try:
            ref4 = reference(vocab, batch)

            def decode(parallel):
                initialize_model_parallel(parallel, seed=7)
                engine = engine_for(parallel, vocab)
                load_reference_weights(engine, ref4["params"])
                cached, ragged = greedy(engine, tok), greedy_ragged(engine, tok)
                return {"tokens": cached.tokens.tolist(), "logprobs": cached.logprobs.tolist(),
                        "nocache_tokens": greedy_nocache(engine, tok).tokens.tolist(),
                        "ragged_tokens": ragged.tokens.tolist(), "ragged_logprobs": ragged.logprobs.tolist(),
                        "chunks": len(engine.stages)}

            base = decode(ParallelConfig())
            mine = decode(ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2))
        finally:
            MODEL = two_layers
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
        return {"base": base, "ranks": every}

    check("tp2", tp2)
    check("tp2_logits", tp2_logits)
    check("tp2_sp", tp2_sp)
    check("pp2", pp2)
    check("chunked_logits_tp1", lambda: chunked_logits(ParallelConfig()))
    check("chunked_logits_tp2", lambda: chunked_logits(ParallelConfig(tensor_model_parallel_size=2)))
    check("chunked_logits_tp2_sp", lambda: chunked_logits(ParallelConfig(tensor_model_parallel_size=2,
                                                                         sequence_parallel=True)))
    check("chunked_logits_pp2", lambda: chunked_logits(ParallelConfig(pipeline_model_parallel_size=2), BATCH // 2))
    check("pp2_vpp2", pp2_vpp2)
    check("dpo_pp2_vpp2", dpo_pp2_vpp2)
    check("dp2", dp2)
    check("dp2_reductions", dp2_reductions)
    check("dp2_distopt", dp2_distopt)
    check("ckpt_tp2_to_tp1", lambda: ckpt(2, 1))
    check("ckpt_tp1_to_tp2", lambda: ckpt(1, 2))
    check("ckpt_pp2_to_pp1", ckpt_pp2_to_pp1)
    def ppo_step(tp, sp=False, pack=False):
        """One PPO actor update (clipped policy loss + value loss on a value head) on a fixed
        synthetic rollout batch; returns loss, stats and full (TP-gathered) grads."""
        from nemo_rlhf.models.heads import attach_value_head
        from nemo_rlhf.modules.ppo import actor_forward

        initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp), seed=7)
        torch.manual_seed(7)
        engine = MegatronEngine(MODEL, ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp), OPTIM,
                                vocab, max_steps=10, setup=lambda g: attach_value_head(g, MODEL.hidden_size))
        load_reference_weights(engine, ppo_ref["params"])
        g = torch.Generator().manual_seed(3)
        mask = batch["loss_mask"]
        rollout = {"tokens": batch["tokens"], "labels": batch["labels"], "loss_mask": mask,
                   "logprobs": (-3 + 0.3 * torch.randn(mask.shape, generator=g)) * mask,
                   "advantages": torch.randn(mask.shape, generator=g) * mask,
                   "values": 0.1 * torch.randn(mask.shape, generator=g) * mask,
                   "returns": torch.randn(mask.shape, generator=g) * mask}
        stats = engine.forward_backward(rollout, BATCH // 2, partial(actor_forward, ppo=PPO, with_value=True, pack=pack))
        grads = {n: tp_full(p.main_grad, p) for n, p in named_params(engine)}
        return stats, grads

    def ppo_tp(tp, sp=False, pack=False):
        stats, grads = ppo_step(tp, sp, pack)
        if tp == 1:
            ppo_ref["stats"], ppo_ref["grads"] = stats, grads
            return {k: v for k, v in stats.items()}
        # (num_tokens is a count over DP ranks: 2x at TP=1 here, where both DP ranks see the full batch)
        out = {"max_stat_abs_diff": max(abs(stats[k] - ppo_ref["stats"][k]) for k in ppo_ref["stats"]
                                        if k not in COUNTS),
               "grad_max_abs_diff": max(float((grads[n] - ppo_ref["grads"][n]).abs().max()) for n in grads),
               "value_head_grad_norm": float(grads["value_head.linear.weight"].norm()),
               "policy_clipfrac": stats["policy_clipfrac"]}
        return out

    ppo_ref = {"params": ref["params"]}
    # the value head starts at zero weights; give it the same random init on every layout
    ppo_ref["params"] = dict(ref["params"])
    ppo_ref["params"]["value_head.linear.weight"] = 0.1 * torch.randn(1, MODEL.hidden_size,
                                                                      generator=torch.Generator().manual_seed(11))
    ppo_ref["params"]["value_head.linear.bias"] = torch.zeros(1)
    check("ppo_tp1", lambda: ppo_tp(1))
    check("ppo_tp2", lambda: ppo_tp(2))
    check("ppo_tp2_sp", lambda: ppo_tp(2, sp=True))
    # the rollouts packed into fewer rows for the update (data.packing), value head read through the packing
    check("ppo_tp2_packed", lambda: ppo_tp(2, pack=True))
    check("ppo_tp2_sp_packed", lambda: ppo_tp(2, sp=True, pack=True))
    def grpo_step(tp, dp_split):
        """One GRPO actor update (no critic) on a synthetic rollout of 2 prompts x 4 samples whose
        advantages are the group-normalised scores; at DP=2 each rank takes half the rows in
        micro-batches of one (so per-sequence means, token counts and the KL term cross ranks)."""
        from megatron.core import parallel_state as ps

        from nemo_rlhf.algorithms.advantages import estimate_advantages
        from nemo_rlhf.modules.ppo import actor_forward

        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        initialize_model_parallel(parallel, seed=7)
        engine = engine_for(parallel, vocab)
        load_reference_weights(engine, ref["params"])
        g = torch.Generator().manual_seed(5)
        mask = batch["loss_mask"]
        rewards = torch.zeros(mask.shape)
        rewards[torch.arange(BATCH), mask.cumsum(-1).argmax(-1)] = torch.tensor([1., 0., 0., 1., 0., 0., 0., 1.])
        groups = torch.arange(BATCH) // 4
        adv, _ = estimate_advantages("grpo", rewards, None, mask, GRPO, groups)
        rollout = {"tokens": batch["tokens"], "labels": batch["labels"], "loss_mask": mask,
                   "logprobs": (-3 + 0.3 * torch.randn(mask.shape, generator=g)) * mask,
                   "ref_logprobs": (-3 + 0.3 * torch.randn(mask.shape, generator=g)) * mask, "advantages": adv}
        mbs = BATCH // 2
        if dp_split:
            r, n = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
            rollout = {k: v[r * BATCH // n:(r + 1) * BATCH // n] for k, v in rollout.items()}
            mbs = 1
        stats = engine.forward_backward(rollout, mbs, partial(actor_forward, ppo=GRPO, with_value=False))
        return stats, {n: tp_full(p.main_grad, p) for n, p in named_params(engine)}

    def grpo(tp, dp_split=False):
        stats, grads = grpo_step(tp, dp_split)
        if tp == 1 and not dp_split:
            grpo_ref["stats"], grpo_ref["grads"] = stats, grads
            return dict(stats)
        return {"loss_diff": abs(stats["loss"] - grpo_ref["stats"]["loss"]),
                "kl_loss_diff": abs(stats["kl_loss"] - grpo_ref["stats"]["kl_loss"]),
                "grad_max_abs_diff": max(float((grads[n] - grpo_ref["grads"][n]).abs().max()) for n in grads),
                "grad_norm": sum(float(v.norm() ** 2) for v in grads.values()) ** 0.5}

    grpo_ref = {}
    check("grpo_tp1", lambda: grpo(1))
    check("grpo_tp2", lambda: grpo(2))
    check("grpo_dp2", lambda: grpo(1, dp_split=True))

    def ilql_tp(tp):
        """One ILQL step (Q, V, CQL, AWAC terms) on the same batch of walks labeled with optimality."""
        from nemo_rlhf.data.ilql import ILQLDataset
        from nemo_rlhf.models.heads import attach_ilql_heads
        from nemo_rlhf.modules.ilql import ilql_forward

        task = RandomWalks(seed=1000)
        walks = task.walks[:BATCH]
        ds = ILQLDataset.build([task.walk_text(w) for w in walks], [task.walk_optimality(w) for w in walks],
                               tok, MODEL.seq_length)
        ibatch = {k: getattr(ds, k) for k in ("tokens", "labels", "loss_mask", "rewards", "next_nonterminal")}
        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        initialize_model_parallel(parallel, seed=7)
        torch.manual_seed(7)
        engine = MegatronEngine(MODEL, parallel, OPTIM, vocab, max_steps=10, setup=lambda g: attach_ilql_heads(g))
        if tp == 1:
            ilql_ref["params"] = {n: tp_full(p, p) for n, p in named_params(engine)}
        load_reference_weights(engine, ilql_ref["params"])
        stats = engine.forward_backward(ibatch, BATCH // 2, partial(ilql_forward, cfg=ILQLConfig()))
        grads = {n: tp_full(p.main_grad, p) for n, p in named_params(engine) if hasattr(p, "main_grad")}
        if tp == 1:
            ilql_ref["stats"], ilql_ref["grads"] = stats, grads
            return stats
        return {"max_stat_abs_diff": max(abs(stats[k] - ilql_ref["stats"][k]) for k in stats if k not in COUNTS),
                "grad_max_abs_diff": max(float((grads[n] - ilql_ref["grads"][n]).abs().max()) for n in grads),
                "q_head_grad_norm": float(grads["ilql_heads.q_heads.0.weight"].norm()),
                "v_head_grad_norm": float(grads["ilql_heads.v_head.weight"].norm()),
                "n_grads": len(grads)}

    def dpo_layout(parallel, mbs, kto=False, dp_split=False, pack=False):
        """One DPO step (sigmoid loss, precomputed reference) on the same 4 pairs, or one KTO step on
        them unpaired (8 examples, z0 from all of their mismatched pairs); with ``dp_split`` each DP
        rank takes its share of the examples."""
        from megatron.core import parallel_state as ps

        from nemo_rlhf.data.preference import KTODataset, PreferenceDataset, randomwalk_pairs, unpair
        from nemo_rlhf.modules.dpo import FORWARD_BACKWARD

        pairs = randomwalk_pairs(RandomWalks(seed=1000), tok, 4, seed=0)
        if kto:
            ds = KTODataset.build_unpaired(unpair(pairs), MODEL.seq_length, tok.pad_id, tok.eos_id, seed=0)
        else:
            ds = PreferenceDataset.build(pairs, MODEL.seq_length, tok.pad_id, tok.eos_id)
        g = torch.Generator().manual_seed(5)
        ref_logps = -6 + torch.randn(len(ds), 2, generator=g)
        if kto:
            # below the policy's log-probs of the mismatched completions: z0 > 0 (not clamped)
            ref_logps[:, 1] -= 30
        pbatch = {"tokens": ds.tokens, "labels": ds.labels, "loss_mask": ds.loss_mask, "ref_logps": ref_logps}
        if kto:
            pbatch["desirable"] = ds.desirable
        engine = engine_for(parallel, vocab)
        load_reference_weights(engine, ref["params"])
        if dp_split:
            r, n = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
            size = len(ds) // n
            pbatch = {k: v[r * size:(r + 1) * size] for k, v in pbatch.items()}
        stats = FORWARD_BACKWARD["kto" if kto else "dpo"](engine, pbatch, mbs, KTO if kto else DPO, pack=pack)
        grads = {n: tp_full(p.main_grad, p) for n, p in named_params(engine)}
        return stats, grads

    def dpo_check(parallel, mbs, kto=False, dp_split=False, pack=False):
        stats, grads = dpo_layout(parallel, mbs, kto, dp_split, pack)
        base = kto_ref if kto else dpo_ref
        if "stats" not in base:
            base["stats"], base["grads"] = stats, grads
            return {k: v for k, v in stats.items()}
        return {"max_stat_abs_diff": max(abs(stats[k] - base["stats"][k]) for k in stats if k not in COUNTS),
                "grad_max_abs_diff": max(float((grads[n] - base["grads"][n]).abs().max()) for n in grads)}

    dpo_ref = {}
    check("dpo_tp1", lambda: dpo_check(ParallelConfig(), 4))
    check("dpo_tp2", lambda: dpo_check(ParallelConfig(tensor_model_parallel_size=2), 4))
    check("dpo_pp2", lambda: dpo_check(ParallelConfig(pipeline_model_parallel_size=2), 2))
    # (dpo_tp1 / kto_tp1 run at DP=2 with the whole batch on both ranks: the DP=1 result)
    check("dpo_dp2", lambda: dpo_check(ParallelConfig(), 1, dp_split=True))
    # chosen and rejected packed into fewer rows for the forward (data.packing), at TP=2 and TP=2 + SP
    check("dpo_tp2_packed", lambda: dpo_check(ParallelConfig(tensor_model_parallel_size=2), 4, pack=True))
    check("dpo_tp2_sp_packed", lambda: dpo_check(
        ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), 4, pack=True))
    # across 2 pipeline stages: each micro-batch's packed rows have their own shape (the stages
    # exchange it: megatron's variable_seq_lengths)
    check("dpo_pp2_packed", lambda: dpo_check(ParallelConfig(pipeline_model_parallel_size=2), 2, pack=True))
    kto_ref = {}   # z0 from the whole global batch: the same whatever the micro-batch, TP, PP or DP split
    check("kto_tp1", lambda: dpo_check(ParallelConfig(), 4, kto=True))
    check("kto_tp2", lambda: dpo_check(ParallelConfig(tensor_model_parallel_size=2), 4, kto=True))
    check("kto_pp2", lambda: dpo_check(ParallelConfig(pipeline_model_parallel_size=2), 2, kto=True))
    check("kto_dp2", lambda: dpo_check(ParallelConfig(), 1, kto=True, dp_split=True))
    check("kto_tp2_packed", lambda: dpo_check(ParallelConfig(tensor_model_parallel_size=2), 4, kto=True, pack=True))
    check("kto_pp2_packed", lambda: dpo_check(ParallelConfig(pipeline_model_parallel_size=2), 2, kto=True, pack=True))
    ilql_ref = {}
    check("ilql_tp1", lambda: ilql_tp(1))
    check("ilql_tp2", lambda: ilql_tp(2))

    def head_step(kind, parallel, mbs=BATCH // 2, dp_split=False, pack=False):
        """One step of a trainer whose head sits on the last pipeline stage, on a 4-layer model:
        ``actor`` (PPO clipped loss + value loss on a value head), ``critic`` (PPO's separate critic:
        the value loss), ``rm`` (reward model, Bradley-Terry on 4 pairs), ``ilql``. Returns the step's
        stats and the full gradients of every stage (gathered over the pipeline group, on every rank)."""
        from megatron.core import parallel_state as ps

        from nemo_rlhf.data.ilql import ILQLDataset
        from nemo_rlhf.data.preference import PreferenceDataset, randomwalk_pairs
        from nemo_rlhf.models.heads import attach_ilql_heads, attach_value_head
        from nemo_rlhf.modules.critics import critic_forward
        from nemo_rlhf.modules.ilql import ilql_forward
        from nemo_rlhf.modules.ppo import actor_forward
        from nemo_rlhf.modules.reward_model import rm_forward

        initialize_model_parallel(parallel, seed=7)
        torch.manual_seed(7)
        setup = (lambda g: attach_ilql_heads(g)) if kind == "ilql" else (lambda g: attach_value_head(g, MODEL4.hidden_size))
        engine = MegatronEngine(MODEL4, parallel, OPTIM, vocab, max_steps=10, setup=setup)
        if kind not in head_ref:   # the single-process run: its weights (heads with a random init) for every layout
            head_ref[kind] = {"params": {n: tp_full(p, p) for n, p in named_params(engine, MODEL4)}}
            if kind != "ilql":
                head_ref[kind]["params"]["value_head.linear.weight"] = 0.1 * torch.randn(
                    1, MODEL4.hidden_size, generator=torch.Generator().manual_seed(11))
        load_reference_weights(engine, head_ref[kind]["params"], MODEL4)
        g = torch.Generator().manual_seed(3)
        mask = batch["loss_mask"]
        if kind in ("actor", "critic"):
            data = {"tokens": batch["tokens"], "labels": batch["labels"], "loss_mask": mask,
                    "logprobs": (-3 + 0.3 * torch.randn(mask.shape, generator=g)) * mask,
                    "advantages": torch.randn(mask.shape, generator=g) * mask,
                    "values": 0.1 * torch.randn(mask.shape, generator=g) * mask,
                    "returns": torch.randn(mask.shape, generator=g) * mask}
            fwd = partial(actor_forward, ppo=PPO, with_value=True, pack=pack) if kind == "actor" \
                else partial(critic_forward, ppo=PPO, pack=pack)
        elif kind == "rm":
            ds = PreferenceDataset.build(randomwalk_pairs(RandomWalks(seed=1000), tok, 4, seed=0), MODEL4.seq_length,
                                         tok.pad_id, tok.eos_id)
            data, fwd, mbs = {"tokens": ds.tokens, "labels": ds.labels, "loss_mask": ds.loss_mask}, \
                partial(rm_forward, margin=0.0, pack=pack), 2
        else:
            walks = RandomWalks(seed=1000).walks[:BATCH]
            task = RandomWalks(seed=1000)
            ds = ILQLDataset.build([task.walk_text(w) for w in walks], [task.walk_optimality(w) for w in walks],
                                   tok, MODEL4.seq_length)
            data = {k: getattr(ds, k) for k in ("tokens", "labels", "loss_mask", "rewards", "next_nonterminal")}
            fwd = partial(ilql_forward, cfg=ILQLConfig())
        if dp_split:   # each data-parallel rank takes its half of the rows, in micro-batches of one
            r, n = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
            rows = len(next(iter(data.values()))) // n
            data, mbs = {k: v[r * rows:(r + 1) * rows] for k, v in data.items()}, 1
        stats = engine.forward_backward(data, mbs, fwd)
        local = {n: tp_full(p.main_grad, p) for n, p in named_params(engine, MODEL4) if hasattr(p, "main_grad")}
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
        grads = {n: t for part in parts for n, t in part.items()}
        return stats, grads

    def head_check(kind, parallel, dp_split=False, pack=False):
        stats, grads = head_step(kind, parallel, dp_split=dp_split, pack=pack)
        if parallel == ParallelConfig() and not dp_split and not pack:
            head_ref[kind].update(stats=stats, grads=grads)
            return {k: v for k, v in stats.items()}
        ref_stats, ref_grads = head_ref[kind]["stats"], head_ref[kind]["grads"]
        head = "ilql_heads.v_head.weight" if kind == "ilql" else "value_head.linear.weight"
        return {"max_stat_abs_diff": max(abs(stats[k] - ref_stats[k]) for k in ref_stats if k not in COUNTS),
                "grad_max_abs_diff": max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads),
                "missing_grads": sorted(set(ref_grads) - set(grads)),
                "head_grad_norm": float(grads[head].norm()), "n_grads": len(grads)}

    head_ref = {}
    pp2, pp2_vpp2 = (ParallelConfig(pipeline_model_parallel_size=2),
                     ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2))
    for kind in ("actor", "critic", "rm", "ilql"):
        check(f"{kind}_pp1_4layers", lambda: head_check(kind, ParallelConfig()))
        check(f"{kind}_pp2", lambda: head_check(kind, pp2))
        check(f"{kind}_pp2_vpp2", lambda: head_check(kind, pp2_vpp2))
        check(f"{kind}_dp2", lambda: head_check(kind, ParallelConfig(), dp_split=True))
    # data.packing: the reward model's pairs and the separate critic's rollouts packed, at TP=2 + SP
    tp2_sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    check("rm_tp2_sp_packed", lambda: head_check("rm", tp2_sp, pack=True))
    check("critic_tp2_sp_packed", lambda: head_check("critic", tp2_sp, pack=True))
    # ... and across 2 pipeline stages (packed shapes vary per micro-batch: the stages exchange them)
    for kind in ("actor", "critic", "rm"):
        check(f"{kind}_pp2_packed", lambda: head_check(kind, pp2, pack=True))
    def fwd_only(parallel, micro_batch_size):
        """Per-token NLL and value-head outputs of 8 left-padded rows (pads of 0-3) through
        lm_across_stages: megatron's forward-only schedule in micro-batches of ``micro_batch_size``
        (with VPP rounded up to a multiple of PP with filler rows), on the actor check's weights."""
        from nemo_rlhf.models.heads import attach_value_head, value_head_output
        from nemo_rlhf.modules.forward_only import lm_across_stages

        initialize_model_parallel(parallel, seed=7)
        engine = MegatronEngine(MODEL4, parallel, OPTIM, vocab, max_steps=10,
                                setup=lambda g: attach_value_head(g, MODEL4.hidden_size))
        load_reference_weights(engine, head_ref["actor"]["params"], MODEL4)
        tokens, labels = batch["tokens"][:8], batch["labels"][:8]
        pad = torch.tensor([0, 1, 2, 3, 0, 2, 1, 3])
        with torch.no_grad():
            nll, values = lm_across_stages(engine.stages, tokens, labels, pad, value_head_output, micro_batch_size)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, {"nll": nll.tolist(), "values": values.tolist()})
        return {"ranks": every}

    check("fwd_pp1", lambda: fwd_only(ParallelConfig(), None))
    check("fwd_pp2", lambda: fwd_only(pp2, 3))
    check("fwd_pp2_vpp2", lambda: fwd_only(pp2_vpp2, 3))
    check("gen_tp1", lambda: gen(1))
    check("gen_tp2", lambda: gen(2))
    check("gen_pp2", gen_pp2)
    check("gen_pp2_vpp2", gen_pp2_vpp2)
    from tests.distributed.hf_checks import hf_checks   # HF import/export at TP=2 and PP=2

    for name, fn in hf_checks(str(out_path) + ".hf"):
        check(name, fn)

    def t5_tp(tp):
        """T5 (model.arch=t5) at TP=tp on the TP=1 weights: logits, SFT loss and grads, greedy decoding."""
        from nemo_rlhf.generation.sampling import SamplingParams, generate
        from nemo_rlhf.generation.seq2seq import _gather_vocab
        from nemo_rlhf.models.t5 import attention_masks, split_causal_batch

        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        initialize_model_parallel(parallel, seed=11)
        torch.manual_seed(11)
        engine = MegatronEngine(T5_MODEL, parallel, OPTIM, vocab, max_steps=10)
        t5 = engine.module
        if tp == 1:
            t5_ref["params"] = {n: p.detach().clone() for n, p in t5.named_parameters()}
        else:
            from megatron.core import parallel_state as ps

            rank_ = ps.get_tensor_model_parallel_rank()
            with torch.no_grad():
                for n, p in t5.named_parameters():
                    full = t5_ref["params"][n]
                    p.copy_(full.chunk(tp, dim=p.partition_dim)[rank_]
                            if getattr(p, "tensor_model_parallel", False) else full)
            engine.optimizer.reload_model_params()
        sb = split_causal_batch(batch["tokens"], batch["labels"], batch["loss_mask"])
        enc_mask, cross = attention_masks(sb.enc_valid, sb.dec_tokens.shape[1])
        with torch.no_grad():
            logits = _gather_vocab(t5(sb.enc_tokens, sb.dec_tokens, enc_mask, None, cross))
        stats = engine.forward_backward(batch, BATCH, partial(lm_forward_step, loss_fn=sft_loss_func))
        grads = {n: tp_full(p.main_grad, p) for n, p in t5.named_parameters()}
        prompts = torch.tensor([[tok.ids[c]] for c in "bcdefghijk"])
        out = generate(t5, prompts, SamplingParams(max_new_tokens=9, greedy=True, eos_id=tok.eos_id),
                       vocab_size=tok.vocab_size)
        nocache = generate(t5, prompts, SamplingParams(max_new_tokens=9, greedy=True, eos_id=tok.eos_id,
                                                       use_kv_cache=False), vocab_size=tok.vocab_size)
        if tp == 1:
            t5_ref.update(logits=logits, loss=stats["loss"], grads=grads, tokens=out.tokens, logprobs=out.logprobs)
            return {"loss": stats["loss"], "n_grads": len(grads),
                    "grad_norm": float(sum(g.norm() ** 2 for g in grads.values()) ** 0.5),
                    "nocache_tokens_equal": bool(torch.equal(out.tokens, nocache.tokens))}
        return {"logits_max_abs_diff": float((logits - t5_ref["logits"]).abs().max()),
                "loss_diff": abs(stats["loss"] - t5_ref["loss"]),
                "grad_max_abs_diff": max(float((grads[n] - t5_ref["grads"][n]).abs().max()) for n in grads),
                "n_grads": len(grads), "tokens_equal": bool(torch.equal(out.tokens, t5_ref["tokens"])),
                "nocache_tokens_equal": bool(torch.equal(out.tokens, nocache.tokens)),
                "logprobs_max_abs_diff": float((out.logprobs - t5_ref["logprobs"]).abs().max())}

    def t5_hf(tp, variant):
        """A tiny random Hugging Face T5 imported at TP=tp: logits vs transformers' (v1.1 = gated
        tanh-gelu + untied head, whose fc1 and head shard differently from v1.0's)."""
        from transformers import T5Config, T5ForConditionalGeneration

        from nemo_rlhf.interop.hf_t5 import hf_t5_to_megatron, lm_head_is_tied, load_hf_t5, model_config_from_hf_t5
        from nemo_rlhf.models.t5 import attention_masks, build_t5_chunks
        from nemo_rlhf.generation.seq2seq import _gather_vocab

        v = 90
        torch.manual_seed(0)
        hf = T5ForConditionalGeneration(T5Config(
            vocab_size=v, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
            feed_forward_proj="relu" if variant == "v1.0" else "gated-gelu",
            tie_word_embeddings=variant == "v1.0")).eval()
        if variant == "v1.1":
            hf.lm_head.weight = torch.nn.Parameter(0.05 * torch.randn(v, 32))
        sd, hf_cfg = hf.state_dict(), hf.config.to_dict()
        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        initialize_model_parallel(parallel, seed=3)
        model = model_config_from_hf_t5(hf_cfg, ModelConfig(seq_length=16), tied=lm_head_is_tied(sd))
        t5 = build_t5_chunks(model, parallel, v)[0].eval()
        load_hf_t5(hf_t5_to_megatron(sd, hf_cfg, t5.vocab_size), t5, gated=variant == "v1.1")
        g = torch.Generator().manual_seed(1)
        enc, dec = torch.randint(2, v, (2, 9), generator=g), torch.randint(2, v, (2, 5), generator=g)
        valid = torch.ones(2, 9, dtype=torch.bool)
        valid[1, 6:] = False
        enc_mask, cross = attention_masks(valid, dec.shape[1])
        with torch.no_grad():
            want = hf(input_ids=enc, attention_mask=valid.long(), decoder_input_ids=dec).logits
            got = _gather_vocab(t5(enc, dec, enc_mask, None, cross))[..., :v]
        res = {"logits_max_abs_diff": float((got - want).abs().max()), "logits_max_abs": float(want.abs().max())}
        # move every weight (same noise on every rank: replicated tensors stay equal), export from TP=2
        # (a collective: shards gathered, gated fc1 de-interleaved) and reload in transformers
        from transformers import AutoModelForSeq2SeqLM

        from nemo_rlhf.interop import export_hf

        noise = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in t5.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn(p.shape, generator=noise))
            ours = _gather_vocab(t5(enc, dec, enc_mask, None, cross))[..., :v]
        out = export_hf(f"{out_path}.t5_{variant}_tp{tp}", [t5], model, v)
        if out is not None:
            back = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
            with torch.no_grad():
                theirs = back(input_ids=enc, attention_mask=valid.long(), decoder_input_ids=dec).logits
            res["export_reload_max_abs_diff"] = float((theirs - ours).abs().max())
            res["export_moved"] = float((ours - got).abs().max())
        return res

    t5_ref = {}
    check("t5_tp1", lambda: t5_tp(1))
    check("t5_tp2", lambda: t5_tp(2))
    check("t5_hf_v1.0_tp2", lambda: t5_hf(2, "v1.0"))
    check("t5_hf_v1.1_tp2", lambda: t5_hf(2, "v1.1"))
    merged = worst_over_ranks(results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def worst_over_ranks(results):
    """Every rank's results, merged: a check that failed on any rank is an error naming the rank;
    a difference ("..._diff") or a list of missing names is the worst over the ranks (each rank
    compares its own parameters: at PP=2 rank 1 holds the last stage); other values are rank 0's,
    with ``ranks_agree`` saying whether every rank computed the same ones."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, results)
    merged = {}
    for name, first in parts[0].items():
        per_rank = [p.get(name, {"error": "not run on this rank"}) for p in parts]
        failed = [(r, x) for r, x in enumerate(per_rank) if isinstance(x, dict) and "error" in x]
        if failed:
            r, x = failed[0]
            merged[name] = {"error": f"rank {r}: {x['error']}", "trace": x.get("trace", "")}
            continue
        if not isinstance(first, dict):
            merged[name] = first
            continue
        out = dict(first)
        for key, value in first.items():
            values = [x.get(key) for x in per_rank]
            if key.endswith("_diff") and all(isinstance(v, (int, float)) for v in values):
                out[key] = max(values)
            elif key.startswith("missing") and all(isinstance(v, list) for v in values):
                out[key] = sorted({n for v in values for n in v})
        same = all(x.get(k) == v for x in per_rank for k, v in first.items()
                   if not k.endswith("_diff") and isinstance(v, (int, float, str, bool)))
        out["ranks_agree"] = same
        merged[name] = out
    return merged


if __name__ == "__main__":
    main(sys.argv[1])
