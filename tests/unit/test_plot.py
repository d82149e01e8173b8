"""python -m nemo_rlhf.plot: a PNG of a run's curves from metrics.jsonl (also mid-run, cut line and all)."""
import json

from nemo_rlhf.plot import main, plot_run, read_series


def test_plot_of_a_run_in_progress(tmp_path):
    rows = [{"step": s, "kind": "train", "loss": 3.0 / s, "reward_mean": 0.1 * s, "lr": 1e-3, "time/generation_s": 0.1}
            for s in range(1, 6)]
    rows += [{"step": 0, "kind": "eval", "optimality": 0.3}, {"step": 5, "kind": "eval", "optimality": 0.9,
                                                              "note": "text is skipped"}]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 6, "kind": "tra'    # a line cut mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    train, evals = read_series(tmp_path / "metrics.jsonl")
    assert train["loss"][-1] == (5, 0.6) and evals["optimality"] == [(0, 0.3), (5, 0.9)]
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path), "--out", str(tmp_path / "other.png")]) == 0 and (tmp_path / "other.png").is_file()


def test_plot_names_a_directory_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
