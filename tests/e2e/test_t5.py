"""End-to-end T5 (model.arch=t5) policies through ``python -m nemo_rlhf.train``: SFT learns valid walks,
DPO starts at ln 2 and raises optimality, KTO starts at 0.5, PPO and ILQL run a few steps. One SFT run
feeds the others (model.path) so the whole file stays within a couple of minutes on 2 cores. A Hugging
Face T5 directory with a SentencePiece spiece.model (built here) trains with its own tokenizer and
exports back to a directory transformers loads with our logits."""
import json
import math

import pytest

from tests.conftest import train

pytestmark = pytest.mark.slow

SFT_STEPS = 300


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _train_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("t5") / "sft"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", f"trainer.max_steps={SFT_STEPS}",
               "trainer.eval_every_n_steps=0", f"trainer.checkpoint_every_n_steps={SFT_STEPS}"],
              config="t5_sft_tiny"))
    return run


def test_t5_sft_learns_valid_walks(sft_run):
    s = json.loads((sft_run / "summary.json").read_text())
    assert s["steps"] == SFT_STEPS and s["layout"] == {"tp": 1, "pp": 1, "dp": 1, "vpp": 1}
    assert "arch: t5" in (sft_run / "config.yaml").read_text()
    init, final = s["initial"], s["final"]
    assert init["valid_rate"] < 0.2                             # random init: junk walks
    assert final["valid_rate"] >= 0.8 and final["valid_rate_greedy"] >= 0.8   # measured 0.90 / 1.0
    assert final["valid_rate"] >= init["valid_rate"] + 0.6
    rows = _train_rows(sft_run)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def _sft_checkpoint(sft_run):
    return sft_run / "checkpoints" / f"step_{SFT_STEPS:07d}"


def test_t5_dpo_first_step_ln2_and_optimality_rises(sft_run, tmp_path):
    run = tmp_path / "dpo"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", f"model.path={_sft_checkpoint(sft_run)}",
               "trainer.eval_every_n_steps=0"],
              config="t5_dpo_tiny"))
    s = json.loads((run / "summary.json").read_text())
    rows = _train_rows(run)
    assert rows[0]["step"] == 1 and abs(rows[0]["loss"] - math.log(2)) < 1e-6   # policy == reference
    assert rows[-1]["rewards/accuracy"] > 0.7
    init, final = s["initial"], s["final"]                      # initial = the T5 SFT policy
    assert final["optimality"] >= init["optimality"] + 0.1     # measured 0.315 -> 0.567
    assert final["valid_rate"] >= 0.75                            # measured 0.919 -> 0.875


def test_t5_ppo_smoke_three_iterations_from_the_sft_policy(sft_run, tmp_path):
    """Smoke test: PPO with a T5 policy and critic runs three iterations (finite losses, rewards in
    range, KL 0 at the first rollout). A frozen model would pass; that the PPO step itself is right is
    shown on GPT by the learning tests and the layout parity checks, which share the loop."""
    run = tmp_path / "ppo"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "model=t5_tiny",
               f"model.path={_sft_checkpoint(sft_run)}", "trainer.max_steps=3", "trainer.eval_every_n_steps=0",
               "ppo.num_rollouts=64", "ppo.ppo_epochs=1", "ppo.num_minibatches=2", "task.eval_samples_per_start=2"],
              config="ppo_tiny"))
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["actor/loss"]) and math.isfinite(r["critic/value_loss"])
        assert 0.0 <= r["reward_mean"] <= 1.0
    assert abs(rows[0]["kl"]) < 1e-5                            # policy == reference at the first rollout
    s = json.loads((run / "summary.json").read_text())
    assert s["initial"]["valid_rate"] >= 0.7                    # started from the T5 SFT policy


def test_t5_ilql_smoke_three_steps(sft_run, tmp_path):
    """Smoke test: ILQL's heads on a T5 policy train three steps with finite losses and evaluate
    with and without the Q/V shift. A frozen model would pass."""
    run = tmp_path / "ilql"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "model=t5_tiny",
               f"model.path={_sft_checkpoint(sft_run)}", "trainer.max_steps=3", "trainer.eval_every_n_steps=0",
               "task.eval_samples_per_start=2"], config="ilql_tiny"))
    rows = _train_rows(run)
    assert [r["step"] for r in rows][-1] == 3
    assert all(math.isfinite(r["loss"]) for r in rows)
    s = json.loads((run / "summary.json").read_text())
    assert "optimality_beta0" in s["final"]


def test_t5_kto_smoke_first_step_is_the_analytic_value(sft_run, tmp_path):
    """Smoke test: KTO on a T5 policy runs three steps; its first step, with the policy equal to the
    reference, has the analytic loss 0.5 and zero KL / rewards. A frozen model would pass."""
    run = tmp_path / "kto"
    _ok(train([f"hydra.run.dir={run}", "trainer.progress_bar=false", "model=t5_tiny",
               f"model.path={_sft_checkpoint(sft_run)}", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
               "trainer.eval_every_n_steps=0", "kto.num_pairs=256", "task.eval_samples_per_start=2"],
              config="kto_tiny"))
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == 0.5                               # policy == reference: 1 - sigmoid(0)
    assert rows[0]["kl"] == 0.0 and rows[0]["rewards/chosen"] == 0.0
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert "arch: t5" in (run / "config.yaml").read_text()


# -- a Hugging Face T5 directory with its SentencePiece tokenizer (spiece.model), built here --------
_HF_T5_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch, transformers
import nemo_rlhf
from nemo_rlhf.models.gpt import unwrap
from nemo_rlhf.models.t5 import attention_masks

src, run, out = map(Path, sys.argv[1:4])
config = nemo_rlhf.default_sft_config("model=t5_tiny", "trainer.max_steps=2", "trainer.progress_bar=false",
                                      "trainer.eval_every_n_steps=0", "task.eval_samples_per_start=1",
                                      "task.num_walks=64")
trainer = nemo_rlhf.train(model_path=str(src), config=config, run_dir=str(run))
ours = trainer.tokenizer
trainer.save_pretrained(out, megatron=False)
tok = transformers.AutoTokenizer.from_pretrained(str(out))
hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
enc = torch.tensor([tok("bcd", add_special_tokens=False)["input_ids"], tok("efg", add_special_tokens=False)["input_ids"]])
dec = torch.tensor([[0, 5, 6], [0, 7, 8]])
enc_mask, cross = attention_masks(torch.ones_like(enc, dtype=torch.bool), dec.shape[1])
model = unwrap(trainer._engine.chunks[0]).eval()
with torch.no_grad():
    mine = model(enc, dec, enc_mask, None, cross)[..., :hf.config.vocab_size]
    theirs = hf(input_ids=enc, decoder_input_ids=dec).logits
print("RESULT", json.dumps({"ours": type(ours).__name__, "our_ids": ours.encode("bcd"), "hf_ids": enc[0].tolist(),
      "eos": [ours.eos_id, tok.eos_token_id], "pad": [ours.pad_id, tok.pad_token_id],
      "files": sorted(p.name for p in out.iterdir()), "max_diff": (mine - theirs).abs().max().item()}))
"""


def _spiece(directory, symbols, dummy_prefix=False):
    """A tiny SentencePiece model in T5's layout (<pad>=0, </s>=1, <unk>=2, no BOS), node letters as
    single pieces (user-defined symbols, no word prefix) -- or, with ``dummy_prefix``, the default
    "\u2581" word prefix that glues letters into words."""
    import sentencepiece as spm
    text = ["".join(symbols[i:] + symbols[:i]) for i in range(len(symbols))] * 5 + ["the graph walks reach"] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(directory / "spiece"), vocab_size=60, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
        **({} if dummy_prefix else {"user_defined_symbols": list(symbols), "add_dummy_prefix": False}))
    (directory / "spiece.vocab").unlink()


def test_hf_t5_directory_brings_its_sentencepiece_tokenizer_and_exports_it(tmp_path):
    import subprocess
    import sys

    import transformers
    from nemo_rlhf.data.tokenizers import SentencePieceTokenizer, TokenizerError, tokenizer_for
    from nemo_rlhf.tasks.randomwalks import RandomWalks
    from tests.conftest import ROOT

    symbols = RandomWalks().vocab
    src = tmp_path / "hf_t5"
    src.mkdir()
    _spiece(src, symbols)
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                                           "eos_token": "</s>", "pad_token": "<pad>"}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(src))
    import torch

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(hf_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(str(src))

    tok = tokenizer_for(src, symbols)                 # spiece.model, not the task's CharTokenizer
    assert isinstance(tok, SentencePieceTokenizer) and tok.path.name == "spiece.model"
    assert tok.encode("bcd") == hf_tok("bcd", add_special_tokens=False)["input_ids"] == [4, 5, 6]
    assert (tok.eos_id, tok.pad_id) == (1, 0)
    bad = tmp_path / "prefixed"                      # "\u2581" word prefixes: refused, named
    bad.mkdir()
    _spiece(bad, symbols, dummy_prefix=True)
    (bad / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(TokenizerError, match="one token per node"):
        tokenizer_for(bad, symbols)

    proc = subprocess.run([sys.executable, "-c", _HF_T5_SCRIPT, str(src), str(tmp_path / "run"),
                           str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    _ok(proc)
    assert "tokenizer: SentencePieceTokenizer" in proc.stdout + proc.stderr
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    print(f"\nHF T5 + spiece.model, 2 SFT steps, exported: max|logits - transformers| = {res['max_diff']:.2e}")
    assert res["ours"] == "SentencePieceTokenizer" and res["our_ids"] == res["hf_ids"] == [4, 5, 6]
    assert res["eos"] == [1, 1] and res["pad"] == [0, 0]
    assert "spiece.model" in res["files"] and "model.safetensors" in res["files"]
    assert res["max_diff"] < 2e-5                     # the trained policy, reloaded by transformers; measured 5.7e-6
