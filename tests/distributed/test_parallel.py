"""TP / sequence-parallel / PP / DP / checkpoint-resharding / generation against the single-process
result, all from ONE 2-rank torchrun launch of parallel_checks.py (see its docstring)."""
import json

import pytest

from tests.conftest import torchrun

pytestmark = pytest.mark.distributed

EXACT = 1e-6   # fp32, same math in a different order
STEP = 1e-6    # params after one SGD step (lr 0.5)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "results.json"
    proc = torchrun(["tests/distributed/parallel_checks.py", str(out)], nproc=2, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    return res


def _ok(results, name):
    r = results[name]
    assert "error" not in r, f"{name} failed on the ranks:\n{r.get('error')}\n{r.get('trace')}"
    return {k: v for k, v in r.items() if k != "ranks_agree"}


def test_every_rank_ran_every_check_and_computed_the_same_results(results):
    """The launch merges both ranks' results (differences: the worst rank's). Apart from the HF T5
    export, which only rank 0 writes and reloads, both ranks computed the same values."""
    for name, r in results.items():
        assert "ranks_agree" in r, name
        assert r["ranks_agree"] or name.startswith("t5_hf_"), name


def test_reference_engine_matches_plain_autograd(results):
    # the megatron schedule + per-token loss reproduces sum(nll * mask) / sum(mask)
    assert _ok(results, "reference")["engine_loss_diff"] < EXACT


def test_tp2_logits_loss_grads(results):
    assert _ok(results, "tp2_logits")["logits_max_abs_diff"] < 1e-5
    r = _ok(results, "tp2")
    assert r["loss_diff"] < EXACT
    assert r["grad_max_abs_diff"] < EXACT
    assert r["param_after_step_max_abs_diff"] < STEP


def test_tp2_sequence_parallel(results):
    r = _ok(results, "tp2_sp")
    assert r["loss_diff"] < EXACT
    assert r["grad_max_abs_diff"] < EXACT
    assert r["param_after_step_max_abs_diff"] < STEP


@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp2_sp", "pp2"])
def test_logits_computed_in_chunks_equal_the_single_process_step(results, layout):
    r = _ok(results, f"chunked_logits_{layout}")
    # the chunked path ran on each rank with the output layer (at PP=2 the last stage, rank 1), over
    # at least the 8 rows x 11 positions of the batch (right padding trimmed; wider with SP's multiple)
    counts = r["chunked_tokens_by_rank"]
    assert counts[0] == 0 if layout == "pp2" else counts[0] >= 8 * 11
    assert counts[1] >= 8 * 11
    assert r["loss_diff"] < EXACT
    assert r["grad_max_abs_diff"] < EXACT
    assert r["param_after_step_max_abs_diff"] < STEP


def test_pp2_loss_and_grads(results):
    r = _ok(results, "pp2")
    assert r["loss_diff"] < EXACT
    assert r["grad_max_abs_diff"] < EXACT
    assert r["param_after_step_max_abs_diff"] < STEP


def test_pp2_interleaved_vpp2_loss_and_grads(results):
    """Interleaved 1F1B (2 stages x 2 virtual chunks, 4 micro-batches) equals the 4-layer single process."""
    r = _ok(results, "pp2_vpp2")
    assert r["chunks"] == 2 and r["layers_per_chunk"] == [1, 1]
    assert r["loss_diff"] < EXACT
    assert r["grad_max_abs_diff"] < EXACT
    assert r["param_after_step_max_abs_diff"] < STEP


def test_dpo_step_interleaved_pp2_vpp2_equals_pp1(results):
    r = _ok(results, "dpo_pp2_vpp2")
    assert r["loss"] > 0
    assert r["max_stat_abs_diff"] < 1e-5
    assert r["grad_max_abs_diff"] < 1e-6


def test_dp2_replicas_identical_and_equal_single_process(results):
    r = _ok(results, "dp2")
    assert r["loss_diff"] < EXACT
    assert r["grad_max_abs_diff"] < EXACT
    assert r["param_after_step_max_abs_diff"] < STEP
    assert r["replica_max_abs_diff"] == 0.0


def test_dp2_ppo_whitening_and_running_moments_equal_the_whole_batch_on_every_rank(results):
    r = _ok(results, "dp2_reductions")
    assert r["dp_size"] == 2 and len(r["whiten_max_abs_diff"]) == 2
    assert max(r["whiten_max_abs_diff"]) < 1e-6
    assert min(r["shard_alone_whiten_max_abs_diff"]) > 1e-2     # the reduction is what makes them equal
    assert max(r["moments_max_abs_diff"]) < 1e-5
    assert r["moments"][0] == pytest.approx(2 * 8)              # two iterations of 8 scores


def test_dp2_distributed_optimizer_equals_plain_optimizer(results):
    r = _ok(results, "dp2_distopt")
    assert r["loss_diff"] < EXACT
    assert r["moved_max_abs"] > 1e-3                      # the step did something
    assert r["param_after_step_vs_plain_adam_max_abs_diff"] < 1e-6
    assert r["replica_max_abs_diff"] == 0.0


@pytest.mark.parametrize("name", ["ckpt_tp2_to_tp1", "ckpt_tp1_to_tp2"])
def test_checkpoint_reshards_between_tp_sizes(results, name):
    r = _ok(results, name)
    assert r["before_load_max_abs_diff"] > 1e-3          # the loader really started elsewhere
    assert r["after_load_max_abs_diff"] == 0.0           # identical weights after load
    assert r["step"] == 1
    assert r["note"] == "x"                              # loop state round-trips
    # optimizer state resharded too: the next Adam step matches the run that never stopped
    assert r["second_step_moved"] > 1e-3
    assert r["second_step_max_abs_diff"] < 1e-6


def test_checkpoint_saved_at_pp2_loads_at_pp1_for_sampling(results):
    r = _ok(results, "ckpt_pp2_to_pp1")
    assert r["after_load_vs_single_process_step"] < STEP
    assert r["generates"] == 10


def test_generation_tp2_equals_tp1_and_kv_cache_equals_no_cache(results):
    g1, g2 = _ok(results, "gen_tp1"), _ok(results, "gen_tp2")
    assert g1["tokens"] == g2["tokens"]
    assert g1["tokens"] == g1["nocache_tokens"] and g2["tokens"] == g2["nocache_tokens"]
    diff = max(abs(a - b) for ra, rb in zip(g1["logprobs"], g2["logprobs"]) for a, b in zip(ra, rb))
    assert diff < 1e-5


def test_generation_across_two_pipeline_stages_equals_pp1_on_every_rank(results):
    """PP=2: each stage runs its layers with its own KV cache, the last stage chooses; both ranks
    hold the PP=1 sequences token for token (also for left-padded prompts of several lengths)."""
    base, r = _ok(results, "gen_tp1"), _ok(results, "gen_pp2")
    assert len(r["ranks"]) == 2
    for rank in r["ranks"]:
        assert rank["tokens"] == base["tokens"] == rank["nocache_tokens"]
        assert rank["ragged_tokens"] == base["ragged_tokens"]
        for key in ("logprobs", "ragged_logprobs"):
            diff = max(abs(a - b) for ra, rb in zip(rank[key], base[key]) for a, b in zip(ra, rb))
            assert diff < 1e-5, (key, diff)
    assert any(t != 0 for row in base["ragged_tokens"] for t in row[4:])     # something was generated


def test_generation_across_interleaved_virtual_stages_equals_pp1_on_every_rank(results):
    """PP=2 x VPP=2 (each rank runs two chunks, the ring twice per token): the 4-layer PP=1 greedy
    sequences token for token on both ranks, ragged prompts included; log-probs within 1e-5."""
    r = _ok(results, "gen_pp2_vpp2")
    base = r["base"]
    assert len(r["ranks"]) == 2
    for rank in r["ranks"]:
        assert rank["chunks"] == 2
        assert rank["tokens"] == base["tokens"] == rank["nocache_tokens"] == base["nocache_tokens"]
        assert rank["ragged_tokens"] == base["ragged_tokens"]
        for key in ("logprobs", "ragged_logprobs"):
            diff = max(abs(a - b) for ra, rb in zip(rank[key], base[key]) for a, b in zip(ra, rb))
            assert diff < 1e-5, (key, diff)
    assert any(t != 0 for row in base["ragged_tokens"] for t in row[4:])


@pytest.mark.parametrize("layout", ["fwd_pp2", "fwd_pp2_vpp2"])
def test_forward_only_pass_through_the_pipeline_schedule_equals_pp1_on_every_rank(results, layout):
    """The experience pass / reward scoring at PP=2 (and x VPP=2): 8 left-padded rows in micro-batches
    of 3 (3 micro-batches, the last one filled up; with VPP a 4th of filler rows) through megatron's forward-only
    schedule; every rank holds the single-process NLL and value-head outputs."""
    base = _ok(results, "fwd_pp1")["ranks"][0]
    r = _ok(results, layout)
    assert len(r["ranks"]) == 2
    values = [v for row in base["values"] for v in row]
    assert max(abs(v) for v in values) > 1e-3 and len(base["nll"]) == 8     # a real head, every row
    for rank in r["ranks"]:
        for key in ("nll", "values"):
            diff = max(abs(a - b) for ra, rb in zip(rank[key], base[key]) for a, b in zip(ra, rb))
            assert diff < 1e-5, (layout, key, diff)


@pytest.mark.parametrize("name", ["ppo_tp2", "ppo_tp2_sp", "ppo_tp2_packed", "ppo_tp2_sp_packed"])
def test_ppo_actor_step_tp2_equals_tp1(results, name):
    """Clipped policy loss + clipped value loss on a value head, same rollout batch (``_packed``: the
    rollouts packed into fewer rows, data.packing, against the unpacked TP=1 step)."""
    base = _ok(results, "ppo_tp1")
    assert 0.0 < base["policy_clipfrac"] < 1.0              # both clipped and unclipped tokens
    assert base["value_clipfrac"] > 0.0
    r = _ok(results, name)
    assert r["max_stat_abs_diff"] < 1e-5
    assert r["grad_max_abs_diff"] < 1e-6
    assert r["value_head_grad_norm"] > 1e-3                 # the value loss reached the head


@pytest.mark.parametrize("name", ["grpo_tp2", "grpo_dp2"])
def test_grpo_actor_step_tp2_and_dp2_equal_the_single_process_step(results, name):
    """No critic; per-sequence-mean aggregation, k3 KL term, clip-higher: at DP=2 each rank has half
    the sequences in micro-batches of one, and the loss and gradients still equal the whole batch's."""
    base = _ok(results, "grpo_tp1")
    assert 0.0 < base["clipfrac_high"] + base["clipfrac_low"] < 1.0 and base["kl_loss"] > 0.0
    r = _ok(results, name)
    assert r["loss_diff"] < 1e-6 and r["kl_loss_diff"] < 1e-6
    assert r["grad_max_abs_diff"] < 1e-6 and r["grad_norm"] > 1e-3


def test_ilql_step_tp2_equals_tp1(results):
    base = _ok(results, "ilql_tp1")
    assert all(base[k] > 0 for k in ("loss_q", "loss_v", "loss_cql", "loss_awac"))
    r = _ok(results, "ilql_tp2")
    assert r["max_stat_abs_diff"] < 1e-5
    assert r["grad_max_abs_diff"] < 1e-6
    assert r["q_head_grad_norm"] > 1e-4 and r["v_head_grad_norm"] > 1e-4


@pytest.mark.parametrize("kind", ["actor", "critic", "rm", "ilql"])
@pytest.mark.parametrize("layout", ["pp2", "pp2_vpp2", "dp2"])
def test_head_trainers_at_pp2_vpp2_and_dp2_equal_the_single_process_step(results, kind, layout):
    """PPO's actor with a value head, PPO's separate critic, the reward model and ILQL: their heads sit
    on the last pipeline stage; the step's stats and every stage's gradients (gathered over the
    pipeline group) equal the single-process step on the same 4-layer weights."""
    base = _ok(results, f"{kind}_pp1_4layers")
    assert base["loss"] != 0.0
    r = _ok(results, f"{kind}_{layout}")
    assert r["missing_grads"] == [] and r["n_grads"] > 10
    assert r["max_stat_abs_diff"] < 1e-5, r
    assert r["grad_max_abs_diff"] < 1e-6, r
    assert r["head_grad_norm"] > 1e-4                        # the loss reached the head on the last stage


@pytest.mark.parametrize("kind", ["actor", "critic", "rm"])
def test_packed_head_trainers_across_two_pipeline_stages_equal_the_unpacked_single_process_step(results, kind):
    """data.packing at PP=2: each micro-batch packs into its own number of rows and width, and the
    stages exchange the shape with the activations (megatron's variable_seq_lengths); PPO's actor
    and critic and the reward model then equal the unpacked single-process step."""
    r = _ok(results, f"{kind}_pp2_packed")
    assert r["missing_grads"] == [] and r["n_grads"] > 10
    assert r["max_stat_abs_diff"] < 1e-5, r
    assert r["grad_max_abs_diff"] < 2e-6, r     # fp32: packed rows sum in another order (measured <= 1e-6)
    assert r["head_grad_norm"] > 1e-4


@pytest.mark.parametrize("kind", ["rm", "critic"])
def test_reward_model_and_critic_packed_at_tp2_sp_equal_the_unpacked_single_process_step(results, kind):
    """data.packing: the reward model's chosen / rejected sequences and the critic's rollouts packed
    into fewer rows, the value head read through the packing, at TP=2 with sequence parallel."""
    r = _ok(results, f"{kind}_tp2_sp_packed")
    assert r["missing_grads"] == [] and r["n_grads"] > 10
    assert r["max_stat_abs_diff"] < 1e-5, r
    assert r["grad_max_abs_diff"] < 1e-6, r
    assert r["head_grad_norm"] > 1e-4


@pytest.mark.parametrize("name", ["dpo_tp2", "dpo_pp2", "dpo_dp2", "dpo_tp2_packed", "dpo_tp2_sp_packed",
                                  "dpo_pp2_packed"])
def test_dpo_step_tp2_pp2_and_dp2_equal_tp1(results, name):
    base = _ok(results, "dpo_tp1")
    assert base["loss"] > 0 and 0 < base["rewards/accuracy"] <= 1
    r = _ok(results, name)
    assert r["max_stat_abs_diff"] < 1e-5
    assert r["grad_max_abs_diff"] < 1e-6


@pytest.mark.parametrize("name", ["kto_tp2", "kto_pp2", "kto_dp2", "kto_tp2_packed", "kto_pp2_packed"])
def test_kto_step_tp2_pp2_and_dp2_equal_tp1(results, name):
    """KTO's reference point z0 is the global batch's: the same at TP=2, PP=2 (4 micro-batches) and
    DP=2 with micro-batches of 1 as at TP=1 with micro-batches of 4."""
    base = _ok(results, "kto_tp1")
    assert 0 < base["loss"] < 1 and base["kl"] > 0.1          # each KTO loss is in (0, w); z0 not clamped
    r = _ok(results, name)
    assert r["max_stat_abs_diff"] < 1e-5
    assert r["grad_max_abs_diff"] < 1e-6


def test_t5_tp2_logits_loss_grads_and_decoding_equal_tp1(results):
    base = _ok(results, "t5_tp1")
    assert base["loss"] > 0 and base["grad_norm"] > 1e-3
    r = _ok(results, "t5_tp2")
    assert r["n_grads"] == base["n_grads"]
    assert r["logits_max_abs_diff"] < 1e-5
    assert r["loss_diff"] < EXACT
    assert r["grad_max_abs_diff"] < EXACT
    assert r["tokens_equal"] and r["logprobs_max_abs_diff"] < 1e-5
    assert base["nocache_tokens_equal"] and r["nocache_tokens_equal"]


@pytest.mark.parametrize("layout", ["hf_tp2", "hf_pp2"])
def test_hugging_face_import_and_export_at_tp2_and_pp2(results, layout):
    """GPT-2, Llama (GQA, tied), Mistral, Qwen2 (QKV bias), GPT-NeoX (sequential and Pythia's
    parallel residual) built with transformers:
    imported at TP=2 the logits equal transformers'; exported (gathered) from TP=2 / PP=2 the
    tensors equal the original files."""
    _ok(results, "hf_prepare")
    r = _ok(results, layout)
    assert sorted(r) == ["gpt2", "gpt_neox", "llama", "mistral", "pythia", "qwen2"]
    for arch, m in r.items():
        if layout == "hf_tp2":
            assert 0.0 <= m["logits_max_abs_diff"] < 1e-4, arch
        assert m["export_max_abs_diff"] == 0.0, arch


@pytest.mark.parametrize("name", ["t5_hf_v1.0_tp2", "t5_hf_v1.1_tp2"])
def test_hf_t5_imported_at_tp2_matches_transformers(results, name):
    r = _ok(results, name)
    assert r["logits_max_abs"] > 0.1
    assert r["logits_max_abs_diff"] < 1e-4
    assert r["export_moved"] > 1e-3                       # the exported weights are not the imported ones
    assert r["export_reload_max_abs_diff"] < 1e-4


NEMO_ARCHIVES = ["local_mp_rank.nemo", "te_mp_rank.nemo", "dist_model_weights.nemo", "pp_tp_rank_pp_rank.nemo",
                 "dist_model_weights(extracted)", "nemo2_module_prefix"]


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_nemo_checkpoints_written_from_megatron_tp2_and_pp2_shards_load_at_tp1_and_tp2(results, arch):
    """NeMo's checkpoint layouts as NeMo's own code writes them (tests/distributed/hf_checks.py cites
    NVIDIA/NeMo's save_restore_connector.py, nlp_overrides.py NLPSaveRestoreConnector.save_to,
    megatron_gpt_model.py, the checkpoint converters, nemo/lightning for NeMo 2, and Transformer
    Engine's get_extra_state), filled with the tensors of real megatron-core models: one TP=1 model
    (every tensor random, the vocabulary padded to NeMo's 256 rows at TP=2) resharded by megatron's
    dist_checkpointing to TP=2 and to PP=2, and each rank's ``state_dict()`` / ``sharded_state_dict()``
    saved as NeMo saves it, ``_extra_state`` entries included:
      local_mp_rank.nemo       mp_rank_0{0,1}/model_weights.ckpt, local-spec names (transformer_engine: false)
      te_mp_rank.nemo          the same shards under Transformer Engine names, TE 1.x BytesIO extra states
      dist_model_weights.nemo  model_weights/: megatron dist checkpoint of sharded_state_dict(prefix='model.')
                               (also loaded from the extracted folder)
      pp_tp_rank_pp_rank.nemo  tp_rank_00_pp_rank_00{0,1}/model_weights.ckpt of the PP=2 stages
      nemo2_module_prefix      NeMo 2 weights/ (+ context/) with 'module.'-prefixed keys, saved at TP=2
    model_config.yaml carries NeMo's fields (apply_query_key_layer_scaling: True as in NeMo's configs).
    Each loads through model.path's loader at TP=1 and at TP=2 with the TP=1 model's logits; read whole,
    every .nemo gives the same tensors as the TP=2 mp_rank shards merged."""
    r = _ok(results, f"nemo_{arch}_tp2_pp2")
    assert r["source_tp2_logits_max_abs_diff"] < 1e-5          # the TP=2 shards are the TP=1 model's
    assert r["full_tensors"] > 10
    for name in ("te_mp_rank.nemo", "dist_model_weights.nemo", "pp_tp_rank_pp_rank.nemo"):
        assert r[f"{name}_read_whole_vs_local_max_abs_diff"] == 0.0, name
    for name in NEMO_ARCHIVES:
        if not name.startswith("nemo2"):                        # NeMo 2: the run config gives the architecture
            assert r[f"{name}_arch_matches"], name
        for layout in ("tp1", "tp2"):
            assert r[f"{name}@{layout}_before_load_max_abs_diff"] > 1e-2, (name, layout)
            assert r[f"{name}@{layout}_logits_max_abs_diff"] < 1e-5, (name, layout)
    # refused, naming why: more vocabulary rows than NeMo's padding explains; a zarr model_weights/ folder
    assert r["vocab16.nemo_refused"] and r["zarr_refused"]
