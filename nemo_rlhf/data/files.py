"""Training data from JSONL or parquet files, read with Hugging Face ``datasets``.

Four schemas (column names configurable in ``data.*_key``):

    sft         prompt, completion
    preference  prompt, chosen, rejected          (dpo and its variants, rm)
    kto         prompt, completion, label         (label: true/1 = desirable, false/0 = undesirable)
    prompt      prompt                            (ppo: the policy writes the completions)

Every problem names the file and the row: a missing file, an empty file, a line that is not JSON,
a missing column (with the columns that exist), a null or non-string field, text the tokenizer
cannot encode. Examples longer than ``model.seq_length`` are an error, or truncated / dropped and
counted (``data.overlong``), so a run never trains on silently cut data. A PPO prompt must leave
room for the completion: longer than ``model.seq_length - generation.max_new_tokens`` it is an error,
or loses its start (``truncate``: the end is what the completion continues), or is dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nemo_rlhf.data.ilql import DataError
from nemo_rlhf.logging import get_logger

log = get_logger(__name__)

SCHEMAS: Dict[str, Tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}
SCHEMA_OF_ALGORITHM = {"sft": "sft", "dpo": "preference", "rm": "preference", "kto": "kto", "ppo": "prompt"}


@dataclass
class LengthReport:
    """What the length policy did: counts go to the log and to summary.json."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_rows: List[int] = field(default_factory=list)

    def as_dict(self) -> Dict[str, int]:
        return {"examples": self.examples, "truncated": self.truncated, "dropped": self.dropped}


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet"
    if suffixes and suffixes[-1] in (".jsonl", ".json", ".ndjson"):
        return "json"
    if len(suffixes) >= 2 and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst") and suffixes[-2] in (".jsonl", ".json"):
        return "json"
    raise DataError(f"{path}: cannot tell the format from the extension; set data.format=json or parquet")


def _locate_bad_json_line(path: Path) -> Optional[str]:
    """datasets/pyarrow report JSON errors without a line number: find the first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{lineno}: not valid JSON ({e.msg})"
                if not isinstance(obj, dict):
                    return f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
    except (UnicodeDecodeError, OSError) as e:
        return f"{path}: cannot be read as UTF-8 JSON lines ({e})"
    return None


def read_records(path: str | Path, columns: Sequence[str], fmt: str = "auto",
                 max_examples: Optional[int] = None) -> Dict[str, list]:
    """Column name -> values for ``columns`` from a JSONL or parquet file (through ``datasets``)."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.train_file={path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    kind = _format_of(path, fmt)
    datasets.disable_progress_bars()
    try:
        if kind == "json":
            ds = datasets.Dataset.from_json(str(path), keep_in_memory=True)
        else:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # datasets wraps pyarrow's errors; say which line when we can
        where = _locate_bad_json_line(path) if kind == "json" else None
        raise DataError(where or f"{path}: cannot be read as {kind} ({type(e).__name__}: {e})") from None
    finally:
        datasets.enable_progress_bars()
    if len(ds) == 0:
        raise DataError(f"{path}: no examples")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: missing field(s) {missing}; the file has {ds.column_names} "
                        f"(rename them with data.prompt_key=... etc.)")
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    return {c: ds[c] for c in columns}


def _text(value, path: Path, row: int, key: str) -> str:
    if value is None:
        raise DataError(f"{path}: row {row}: field {key!r} is missing or null")
    if not isinstance(value, str):
        raise DataError(f"{path}: row {row}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _label(value, path: Path, row: int, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(f"{path}: row {row}: field {key!r} must be true/false (or 1/0), got {value!r}")


def fit_length(prompt: List[int], completions: Sequence[List[int]], eos_id: int, budget: int, policy: str,
               where: str) -> Optional[Tuple[List[int], List[List[int]], bool]]:
    """Fit prompt + completion + EOS into ``budget`` tokens (= model.seq_length + 1) for each
    completion (they share the prompt). Returns (prompt, completions with EOS where it still fits,
    truncated?) or None to drop. ``truncate`` keeps the whole prompt when at least one completion
    token fits after it, else the prompt's last ``budget - 1`` tokens (its end is what the
    completion continues); a cut completion loses its EOS (the model must not learn to stop there)."""
    longest = max(len(c) for c in completions) if completions else 0
    need = len(prompt) + longest + 1
    if need <= budget:
        return prompt, [list(c) + [eos_id] for c in completions], False
    if policy == "error":
        raise DataError(f"{where}: {need} tokens (prompt {len(prompt)} + completion {longest} + EOS), more "
                        f"than model.seq_length + 1 = {budget}; raise model.seq_length or set "
                        f"data.overlong=truncate or drop")
    if policy == "drop":
        return None
    if len(prompt) > budget - 1:
        prompt = prompt[len(prompt) - (budget - 1):]
    room = budget - len(prompt)
    out = [list(c) + [eos_id] if len(c) + 1 <= room else list(c[:room]) for c in completions]
    return prompt, out, True


def _encode(tokenizer, text: str, where: str) -> List[int]:
    try:
        return list(tokenizer.encode(text))
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def fit_prompt(prompt: List[int], budget: int, policy: str, where: str) -> Optional[Tuple[List[int], bool]]:
    """A PPO prompt within ``budget`` tokens (= model.seq_length - generation.max_new_tokens):
    (prompt, truncated?) or None to drop. ``truncate`` keeps the prompt's last ``budget`` tokens."""
    if len(prompt) <= budget:
        return prompt, False
    if policy == "error":
        raise DataError(f"{where}: prompt of {len(prompt)} tokens, more than model.seq_length - "
                        f"generation.max_new_tokens = {budget}; raise model.seq_length, lower "
                        f"generation.max_new_tokens or set data.overlong=truncate or drop")
    if policy == "drop":
        return None
    return prompt[len(prompt) - budget:], True


def load_examples(cfg, schema: str, tokenizer, seq_length: int, max_new_tokens: int = 0):
    """Tokenised examples from ``cfg`` (a DataConfig) for ``schema``:

    sft         [(prompt ids, completion ids + EOS)]
    preference  [(prompt ids, chosen ids + EOS, rejected ids + EOS)]
    kto         [(prompt ids, completion ids + EOS, desirable)]
    prompt      [prompt ids]   (each at most seq_length - max_new_tokens tokens)

    (EOS is absent where an over-long completion was truncated), and a LengthReport."""
    if schema == "prompt" and seq_length - max_new_tokens < 1:
        raise DataError(f"model.seq_length={seq_length} leaves no room for a prompt before "
                        f"generation.max_new_tokens={max_new_tokens} new tokens")
    path = Path(cfg.train_file)
    keys = {"prompt": cfg.prompt_key, "completion": cfg.completion_key, "chosen": cfg.chosen_key,
            "rejected": cfg.rejected_key, "label": cfg.label_key}
    columns = [keys[c] for c in SCHEMAS[schema]]
    data = read_records(path, columns, cfg.format, cfg.max_examples)
    n = len(data[columns[0]])
    report = LengthReport()
    out = []
    for i in range(n):
        row, where = i + 1, f"{path}: row {i + 1}"
        prompt = _encode(tokenizer, _text(data[keys["prompt"]][i], path, row, keys["prompt"]), where)
        if schema == "preference":
            texts = [_text(data[keys[k]][i], path, row, keys[k]) for k in ("chosen", "rejected")]
        elif schema == "prompt":
            texts = []
        else:
            texts = [_text(data[keys["completion"]][i], path, row, keys["completion"])]
        label = _label(data[keys["label"]][i], path, row, keys["label"]) if schema == "kto" else None
        if not prompt:
            raise DataError(f"{where}: empty prompt (the first completion token needs a context)")
        if schema == "prompt":
            fitted = fit_prompt(prompt, seq_length - max_new_tokens, cfg.overlong, where)
            if fitted is None:
                report.dropped += 1
                report.dropped_rows.append(row)
            else:
                out.append(fitted[0])
                report.truncated += int(fitted[1])
            continue
        completions = [_encode(tokenizer, t, where) for t in texts]
        if any(len(c) == 0 for c in completions):
            raise DataError(f"{where}: empty completion")
        fitted = fit_length(prompt, completions, tokenizer.eos_id, seq_length + 1, cfg.overlong, where)
        if fitted is None:
            report.dropped += 1
            report.dropped_rows.append(row)
            continue
        prompt, completions, cut = fitted
        report.truncated += int(cut)
        if schema == "kto":
            out.append((prompt, completions[0], label))
        else:
            out.append((prompt, *completions))
    report.examples = len(out)
    if not out:
        raise DataError(f"{path}: all {n} examples were dropped as longer than model.seq_length={seq_length}")
    if report.truncated or report.dropped:
        log.warning("%s: %d of %d examples longer than model.seq_length=%d were %s", path,
                    report.truncated + report.dropped, n, seq_length,
                    "truncated" if report.truncated else f"dropped (first rows: {report.dropped_rows[:10]})")
    return out, report
