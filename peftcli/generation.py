"""Generation-based evaluation: greedy answers to held-out prompts, scored against the references.
This is what shows a fine-tune learned a behaviour (the quickstart's before/after number)."""

from __future__ import annotations

import json

import torch

from peftcli.data import Renderer
from peftcli.errors import UserError, one_line


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
    # encoder-decoder (seq2seq): the prompt is the encoder's input, right-padded; the output is all new tokens
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        n = max(map(len, chunk))
        # causal LMs: left padding, so every row's next token comes right after its prompt
        padded = lambda real, fill: real + fill if seq2seq else fill + real  # noqa: E731
        ids = torch.tensor([padded(p, [pad] * (n - len(p))) for p in chunk], device=device)
        mask = torch.tensor([padded([1] * len(p), [0] * (n - len(p))) for p in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(gen if seq2seq else gen[:, n:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


def eval_format(data_cfg) -> str:
    """The format of the held-out rows: data.eval's, or data.train's when they come from data.eval_ratio
    (as data.prepare reads them)."""
    fmt = (data_cfg.eval or data_cfg.first_train).format or data_cfg.format
    return "chat" if fmt == "sharegpt" else fmt  # ShareGPT rows are read into chat messages


def check_generation_eval(recipe, prepared) -> None:
    """Raise UserError (key train.generation_eval, with the fix) when train.generation_eval is set but the
    prepared data gives it nothing to generate from; a no-op when generation_eval is not set. Call it
    right after data.prepare(), before the model is loaded and before anything is written."""
    from peftcli.recipe import generation_eval_problem

    if recipe.train.generation_eval is None:
        return
    problem = generation_eval_problem(recipe)  # what the recipe alone tells (also checked at load time)
    if problem:
        raise UserError(f"train.generation_eval {problem}")
    rows = getattr(prepared, "eval_rows", None) or []
    if not rows:
        raise UserError("train.generation_eval: the eval data gave no alpaca/chat rows to generate from; "
                        "set data.eval (alpaca or chat rows) or data.eval_ratio, or remove train.generation_eval")
    if eval_format(recipe.data) == "chat":
        for i, row in enumerate(rows):
            messages = row.get("messages") or []
            if len(messages) < 2 or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
                if recipe.data.eval is not None:
                    which = f"data.eval: {recipe.data.eval.path} row {i + 1}"
                else:  # held out by eval_ratio: shuffled, so name the row by its start
                    first = messages[0].get("content") if messages and isinstance(messages[0], dict) else messages
                    which = f"a row of {recipe.data.first_train.path} held out by data.eval_ratio (starting {one_line(repr(first), 60)})"
                raise UserError(f"train.generation_eval: {which} does not end with an assistant message, the reference "
                                "to score against; end every eval conversation with the assistant's reply, or remove "
                                "train.generation_eval")


def generation_eval(model, tokenizer, data_cfg, rows: list[dict], cfg) -> dict:
    fmt = eval_format(data_cfg)
    rows = rows[: cfg.samples]
    renderer = Renderer(tokenizer, data_cfg, "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal-lm")
    prompts = [renderer.prompt_ids(r, fmt) for r in rows]
    refs = [r["messages"][-1]["content"] if fmt == "chat" else r["output"] for r in rows]
    outs = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    score_fn = METRICS[cfg.metric]
    hits = [score_fn(o, r) for o, r in zip(outs, refs, strict=True)]
    examples = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "output": o, "reference": r}
                for p, o, r in zip(prompts, outs, refs, strict=True)]
    return {"score": sum(hits) / max(len(hits), 1), "n": len(hits), "examples": examples}
