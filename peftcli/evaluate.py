"""`peftcli eval`: metrics of an adapter or a model on a data file in any training format.

- loss: mean cross-entropy over label tokens (response tokens for alpaca/chat, the class for seq-cls),
  the same number the training run's eval_loss reports.
- accuracy: seq-cls, the argmax class against the label (names mapped through the model's label map);
  causal LM, generation-based: the greedy answer is mapped to the first label name it starts with
  (labels from --labels, else the distinct references) and compared with the reference's label.
- exact_match / json_match: greedy generation (batched, left-padded: generation.generate) against the
  reference response, equal after stripping / equal as parsed JSON.
"""

from __future__ import annotations

import math
import time

import torch

from peftcli.errors import UserError, did_you_mean

METRICS = ("loss", "accuracy", "exact_match", "json_match")
GENERATIVE = ("exact_match", "json_match")
REFERENCED = ("alpaca", "chat", "sharegpt")  # formats whose rows carry a reference response


def parse_metrics(text: str | None, task: str, fmt: str) -> list[str]:
    if not text:
        if task == "seq-cls":
            return ["loss", "accuracy"]
        return ["loss", "exact_match"] if fmt in REFERENCED else ["loss"]
    names = [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        if m not in METRICS:
            raise UserError(f"--metrics: unknown metric {m!r}{did_you_mean(m, METRICS)}; choose from {', '.join(METRICS)}")
    generative = [m for m in names if m in GENERATIVE or (m == "accuracy" and task != "seq-cls")]
    if generative and task == "seq-cls":
        raise UserError(f"--metrics: {generative[0]} generates text, which a seq-cls model cannot do; use loss,accuracy")
    if generative and fmt not in REFERENCED:
        raise UserError(f"--metrics: {generative[0]} needs rows with a reference response (format alpaca or chat), "
                        f"the data is format {fmt!r}; use --metrics loss")
    return names


@torch.no_grad()
def loss_and_class_accuracy(model, task: str, rows: list[dict], pad_id: int, batch_size: int) -> dict:
    from peftcli.data import Collator
    from peftcli.distributed import label_count
    from peftcli.loss import LossModel

    lm = LossModel(model, task).eval()
    collate = Collator(pad_id)
    device = next(model.parameters()).device
    loss_sum, terms, correct = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        mean, logits = lm(**batch)
        n = sum(label_count(r) for r in chunk)
        if n:
            loss_sum += float(mean) * n
            terms += n
        if task == "seq-cls":
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    out = {"loss": loss_sum / max(terms, 1)}
    if task == "seq-cls":
        out["accuracy"] = correct / max(len(rows), 1)
    return out


def _label_of(text: str, labels: list[str]) -> str | None:
    """The label an answer names: the longest label name the stripped, lower-cased answer starts with."""
    t = text.strip().lower()
    hits = [lab for lab in labels if t.startswith(lab.strip().lower())]
    return max(hits, key=len) if hits else None


def evaluate(target: str, data: str, fmt: str | None = None, metrics: str | None = None, base: str | None = None,
             batch_size: int = 16, max_new_tokens: int = 64, limit: int | None = None, labels: str | None = None,
             examples: int = 3) -> dict:
    from peftcli.data import prepare
    from peftcli.target import data_cfg, load_target

    t0 = time.perf_counter()
    parse_metrics(metrics, "causal-lm", "alpaca")  # unknown names fail before any model loads
    t = load_target(target, base)
    cfg = data_cfg(t, data, fmt)
    if limit:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"limit": limit}),
                                     "eval": cfg.eval.model_copy(update={"limit": limit})})
    fmt = cfg.train.format
    names = parse_metrics(metrics, t.task, fmt)
    prepared = prepare(cfg, t.tokenizer, t.task, label_names=t.label_names if t.task == "seq-cls" else None)
    if names != ["loss"] and t.task != "seq-cls" and not prepared.eval_rows:
        raise UserError(f"--data {data}: no rows with a reference response to generate against; use --metrics loss")
    rows = prepared.eval
    result: dict = {"target": t.source, "kind": t.kind, "method": t.method, "task": t.task, "data": str(data),
                    "format": fmt, "n": len(rows)}
    scores: dict = {}
    if "loss" in names or (t.task == "seq-cls" and "accuracy" in names):
        la = loss_and_class_accuracy(t.model, t.task, rows, t.tokenizer.pad_token_id, batch_size)
        scores.update({k: v for k, v in la.items() if k in names})
    gen = [m for m in names if m in GENERATIVE or (m == "accuracy" and t.task != "seq-cls")]
    if gen:
        from peftcli.generation import METRICS as SAME
        from peftcli.generation import generation_eval
        from peftcli.recipe import GenerationEval

        # the training run's generation eval (prompt rendering, references, batched left-padded greedy decoding)
        cfg_gen = GenerationEval(samples=len(prepared.eval_rows), max_new_tokens=max_new_tokens, batch_size=batch_size, before=False)
        done = generation_eval(t.model, t.tokenizer, cfg, prepared.eval_rows, cfg_gen)["examples"]
        pairs = [(e["output"], e["reference"]) for e in done]
        if "exact_match" in gen:
            scores["exact_match"] = sum(SAME["exact"](o, r) for o, r in pairs) / len(pairs)
        if "json_match" in gen:
            scores["json_match"] = sum(SAME["json"](o, r) for o, r in pairs) / len(pairs)
        if "accuracy" in gen:
            names_ = [s.strip() for s in labels.split(",")] if labels else sorted({r.strip() for _, r in pairs})
            hits = [(p := _label_of(o, names_)) is not None and p == _label_of(r, names_) for o, r in pairs]
            scores["accuracy"] = sum(hits) / len(hits)
            result["labels"] = names_
        result["examples"] = done[:examples]
        result["n_generated"] = len(done)
    result["metrics"] = {m: scores[m] for m in names}
    if "loss" in scores and t.task != "seq-cls":
        result["metrics"]["perplexity"] = math.exp(min(scores["loss"], 50.0))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result
