"""End to end: a Hugging Face GPT-2 directory (built here, with the randomwalks character vocabulary
as tokenizer.json) trains with ``model.path=<dir>``, converts ahead of time with
scripts/convert_checkpoint.py, and the trained policy exports back to a directory transformers loads."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, train

pytestmark = pytest.mark.slow
import transformers  # noqa: E402  (a test dependency: an import error fails, never skips)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """gpt_tiny's architecture (2 x 64, 4 heads, 16 positions) as an HF GPT-2 with random weights."""
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    tok = CharTokenizer(RandomWalks().vocab)
    path = tmp_path_factory.mktemp("hf") / "gpt2_walks"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=16, vocab_size=tok.vocab_size,
                                  bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    tok.save_hf(path)
    return path


def _convert(*args):
    proc = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_convert_import_then_export_is_lossless(hf_dir, tmp_path):
    from nemo_rlhf.interop import read_hf_weights

    _convert("--from-hf", hf_dir, "--to", tmp_path / "ckpt")
    step = tmp_path / "ckpt" / "step_0000000"
    assert (step / "tokenizer.json").is_file() and "activation: gelu_tanh" in (tmp_path / "ckpt" / "model.yaml").read_text()
    _convert("--from-ckpt", step, "--to-hf", tmp_path / "back")
    back, orig = read_hf_weights(tmp_path / "back"), read_hf_weights(hf_dir)
    assert set(back) == set(orig) - {"lm_head.weight"}          # tied: saved once
    assert all(torch.equal(back[k], orig[k]) for k in back)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["n_positions"] == 16
    # bad input names the problem, writes nothing
    proc = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "--from-hf", tmp_path, "--to",
                           tmp_path / "x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a Hugging Face directory" in proc.stderr and not (tmp_path / "x").exists()


def test_train_from_hf_directory_and_export_the_policy(hf_dir, tmp_path):
    run = tmp_path / "run"
    proc = train([f"model.path={hf_dir}", "trainer.max_steps=2", "task.eval_samples_per_start=1",
                  f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "initialised weights from the Hugging Face gpt2 model" in proc.stdout + proc.stderr
    assert "activation: gelu_tanh" in (run / "config.yaml").read_text()   # the architecture came from config.json
    _convert("--from-ckpt", run / "checkpoints" / "step_0000002", "--to-hf", tmp_path / "policy",
             "--source-hf", hf_dir)
    code = ("import sys, transformers, torch\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "out = m.generate(torch.tensor([t.encode('b')]), max_new_tokens=5, do_sample=False)\n"
            "print('OK', t.decode(out[0]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "policy")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK b" in proc.stdout, proc.stderr[-3000:]
