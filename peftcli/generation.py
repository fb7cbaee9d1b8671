"""Generation-based evaluation: greedy answers to held-out prompts, scored against the references.
This is what shows a fine-tune learned a behaviour (the quickstart's before/after number)."""

from __future__ import annotations

import json

import torch

from peftcli.data import Renderer


def _json_equal(output: str, reference: str) -> bool:
    try:
        return json.loads(output.strip()) == json.loads(reference.strip())
    except (json.JSONDecodeError, ValueError):
        return False


METRICS = {"exact": lambda out, ref: out.strip() == ref.strip(), "json": _json_equal}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        n = max(map(len, chunk))
        # left padding, so every row's next token comes right after its prompt
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(gen[:, n:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


def generation_eval(model, tokenizer, data_cfg, rows: list[dict], cfg) -> dict:
    fmt = data_cfg.eval.format if data_cfg.eval and data_cfg.eval.format else data_cfg.format
    rows = rows[: cfg.samples]
    renderer = Renderer(tokenizer, data_cfg)
    prompts = [renderer.prompt_ids(r, fmt) for r in rows]
    refs = [r["messages"][-1]["content"] if fmt == "chat" else r["output"] for r in rows]
    outs = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    score_fn = METRICS[cfg.metric]
    hits = [score_fn(o, r) for o, r in zip(outs, refs, strict=True)]
    examples = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "output": o, "reference": r}
                for p, o, r in zip(prompts, outs, refs, strict=True)]
    return {"score": sum(hits) / max(len(hits), 1), "n": len(hits), "examples": examples}
