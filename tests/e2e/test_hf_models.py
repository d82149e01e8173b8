"""End to end: a Hugging Face Llama-shaped directory (grouped-query attention, RoPE, SwiGLU, RMSNorm,
untied head; random weights, built here, with the randomwalks character vocabulary saved next to it
as tokenizer.json) trains with DPO through ``python -m nemo_rlhf.train --config-name dpo_tiny
model=hf model.path=DIR``; the trained checkpoint exports back (scripts/convert_checkpoint.py) and
transformers' AutoModelForCausalLM / AutoTokenizer reload it with our model's logits."""
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, train

pytestmark = pytest.mark.slow
import transformers  # noqa: E402  (a test dependency: an import error fails, never skips)

# our model from the trained checkpoint vs transformers from the exported directory, on one batch
_COMPARE = r"""
import json, sys
from pathlib import Path
import torch, transformers
from omegaconf import OmegaConf
from nemo_rlhf.checkpoint import load_own_weights, read_meta
from nemo_rlhf.recipes.registry import to_run_config
from nemo_rlhf.config.schema import ParallelConfig
from nemo_rlhf.data.tokenizers import load_tokenizer
from nemo_rlhf.models.gpt import build_gpt_chunks
from nemo_rlhf.parallel import init_distributed, initialize_model_parallel

ckpt, out = map(Path, sys.argv[1:3])
model = to_run_config(OmegaConf.create(read_meta(ckpt)["config"])).model
init_distributed()
initialize_model_parallel(ParallelConfig(), seed=0)
chunks = build_gpt_chunks(model.__class__(**{**model.__dict__, "path": None, "transformer_impl": "local"}),
                          ParallelConfig(), model.vocab_size)
load_own_weights(ckpt, chunks)
tok, ours_tok = transformers.AutoTokenizer.from_pretrained(str(out)), load_tokenizer(out)
texts = ["bcdefgh", "cbaihgf"]
ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"] for t in texts])
hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
with torch.no_grad():
    ours = chunks[0](ids, torch.arange(ids.shape[1]).expand_as(ids), None, runtime_gather_output=True)
    theirs = hf(ids).logits
V = hf.config.vocab_size
print("RESULT", json.dumps({"hf_ids": ids.tolist(), "our_ids": [ours_tok.encode(t) for t in texts],
      "max_diff": (ours[..., :V].float() - theirs).abs().max().item(), "max_logit": theirs.abs().max().item(),
      "model_type": hf.config.model_type, "kv_heads": hf.config.num_key_value_heads}))
"""


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    tok = CharTokenizer(RandomWalks().vocab)
    path = tmp_path_factory.mktemp("hf") / "llama_walks"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32, vocab_size=tok.vocab_size,
                                   tie_word_embeddings=False, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
                                   pad_token_id=tok.pad_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    tok.save_hf(path)
    return path


def test_llama_directory_trains_with_dpo_and_exports_to_transformers(llama_dir, tmp_path):
    run = tmp_path / "dpo"
    proc = train([f"hydra.run.dir={run}", "model=hf", f"model.path={llama_dir}", "trainer.max_steps=3",
                  "trainer.log_every_n_steps=1", "trainer.eval_every_n_steps=0", "trainer.checkpoint_every_n_steps=3",
                  "trainer.progress_bar=false", "dpo.num_pairs=256", "task.eval_samples_per_start=1"],
                 config="dpo_tiny")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "initialised weights from the Hugging Face llama model" in proc.stdout + proc.stderr
    config = (run / "config.yaml").read_text()
    assert "num_query_groups: 2" in config and "activation: swiglu" in config   # from config.json
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6             # policy == reference (the HF model)
    assert rows[-1]["loss"] != rows[0]["loss"] and all(math.isfinite(r["loss"]) for r in rows)

    ckpt, out = run / "checkpoints" / "step_0000003", tmp_path / "policy"
    conv = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "--from-ckpt", str(ckpt), "--to-hf",
                           str(out), "--source-hf", str(llama_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert conv.returncode == 0, conv.stdout[-2000:] + conv.stderr[-3000:]
    cmp = subprocess.run([sys.executable, "-c", _COMPARE, str(ckpt), str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert cmp.returncode == 0, cmp.stderr[-4000:]
    res = json.loads(cmp.stdout.split("RESULT", 1)[1])
    print(f"\nllama (GQA 4/2) after 3 DPO steps, exported: max|logits - transformers| = {res['max_diff']:.2e} "
          f"(logits up to {res['max_logit']:.2f})")
    assert res["model_type"] == "llama" and res["kv_heads"] == 2
    assert res["hf_ids"] == res["our_ids"]                       # AutoTokenizer == the run's tokenizer
    assert res["max_logit"] > 0.1 and res["max_diff"] < 1e-6     # the trained policy's logits; measured 1.2e-7
    # the trained weights, not the initial ones: the export differs from the source model
    src = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir))
    new = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert any(not torch.equal(a, b) for a, b in zip(src.state_dict().values(), new.state_dict().values()))
