"""`peftcli generate`: answers of an adapter (any method, mergeable or not) or a model to prompts.

Prompts are rendered as the training run rendered them (data.Renderer with the adapter's recipe: the
chat template where the tokenizer has one, else the alpaca template), so what you try is what was
trained. One prompt streams token by token (transformers' TextStreamer); `--compare-base` also loads
the base model on its own and shows both answers side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftcli.errors import UserError, one_line


def read_prompts(prompt: str | None, file: str | None) -> list[dict]:
    """Rows to answer: --prompt, or a .jsonl file of {prompt} / {instruction, input} / {messages} rows
    (a plain .txt file: one prompt per line)."""
    if (prompt is None) == (file is None):
        raise UserError("give exactly one of --prompt TEXT or --file PROMPTS.jsonl")
    if prompt is not None:
        return [{"instruction": prompt}]
    path = Path(file)
    if not path.is_file():
        raise UserError(f"--file: {file} not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            rows.append({"instruction": line})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"--file: {file} line {n}: not JSON ({one_line(exc.msg, 80)}); one JSON object per line") from None
        if isinstance(row, str):
            row = {"instruction": row}
        if not isinstance(row, dict) or not any(k in row for k in ("prompt", "instruction", "messages")):
            raise UserError(f"--file: {file} line {n}: expected an object with 'prompt', 'instruction' or 'messages'")
        if "prompt" in row and "instruction" not in row:
            row = {**row, "instruction": row["prompt"]}
        rows.append(row)
    if not rows:
        raise UserError(f"--file: {file} has no prompts")
    return rows


def _renderer(target):
    from peftcli.data import Renderer
    from peftcli.target import data_cfg

    return Renderer(target.tokenizer, data_cfg(target, "prompts.jsonl", "alpaca"), target.task)


def prompt_ids(renderer, row: dict) -> list[int]:
    if "messages" in row:
        messages = list(row["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a reference answer: generate it instead
        if getattr(renderer.tok, "chat_template", None) and not renderer.seq2seq:
            # the chat format's prompt is every message but the last (the reply to generate)
            return renderer.prompt_ids({"messages": [*messages, {"role": "assistant", "content": ""}]}, "chat")
        row = {"instruction": messages[-1]["content"] if messages else ""}
    return renderer.prompt_ids({"instruction": row["instruction"], "input": row.get("input") or ""}, "alpaca")


@torch.no_grad()
def stream_one(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """Greedy answer to one prompt, printed to the terminal as it is generated."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    seq2seq = getattr(model.config, "is_encoder_decoder", False)  # its output holds the new tokens only
    return tokenizer.decode(out[0] if seq2seq else out[0, x.shape[1]:], skip_special_tokens=True)


def run_generate(target: str, prompt: str | None = None, file: str | None = None, compare_base: bool = False,
                 max_new_tokens: int = 64, batch_size: int = 8, base: str | None = None, stream=None) -> list[dict]:
    """Answers as [{prompt, output[, base_output]}]. `stream`: a callable(row_index, prompt_text) called
    before each streamed answer (one at a time) when given; otherwise answers are generated in batches."""
    from peftcli.generation import generate
    from peftcli.target import load_target

    rows = read_prompts(prompt, file)
    t = load_target(target, base, need_adapter=compare_base)
    if t.task == "seq-cls":
        raise UserError(f"{target}: a {t.task} model does not generate text; score it with `peftcli eval {target} --data FILE`")
    renderer = _renderer(t)
    prompts = [prompt_ids(renderer, r) for r in rows]
    texts = [t.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    if stream is not None and not compare_base:
        outs = []
        for i, p in enumerate(prompts):
            stream(i, texts[i])
            outs.append(stream_one(t.model, t.tokenizer, p, max_new_tokens))
    else:
        outs = generate(t.model, t.tokenizer, prompts, max_new_tokens, batch_size)
    result = [{"prompt": text, "output": o} for text, o in zip(texts, outs, strict=True)]
    if compare_base:
        from peftcli.models import load_model

        del t.model  # the base is loaded on its own: the same weights the adapter was trained on, nothing applied
        base_model = load_model(t.base_cfg, t.tokenizer, label_names=t.label_names).model
        for r, o in zip(result, generate(base_model, t.tokenizer, prompts, max_new_tokens, batch_size), strict=True):
            r["base_output"] = o
    return result
