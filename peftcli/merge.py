"""Fold an adapter into its base and prove it: the merged model, reloaded from disk, must give the
unmerged model's logits within the dtype's tolerance, or nothing is written.

Two paths with bit-identical output: streaming (streaming.py: shard by shard from the base's
safetensors files, in about one tensor of memory; the default whenever every part of the adapter has
a per-tensor merge) and in memory (the model loaded, the method's own `merge`; HiWi's weight form,
SAID/DID, GGUF or .bin bases, `--in-memory`). Verification loads the model, so it is skipped by default
when the model does not fit in memory twice (`--verify` forces it, `--no-verify` skips it)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peftcli import adapter_io
from peftcli.errors import UserError
from peftcli.recipe import ModelCfg

# |merged - unmerged| <= atol + rtol * max|unmerged|, per dtype: fp32 is exact up to summation order,
# half precision rounds the merged weights once.
TOLERANCE = {"float32": (1e-4, 1e-5), "bfloat16": (0.0, 5e-2), "float16": (0.0, 1e-2)}
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Parameter-efficient fine-tuning trains a few weights.",
    "Merging must not change what the model says.",
    "1, 2, 3, 4, 5",
]


class MergeMismatch(Exception):
    """The merged model's outputs differ from the adapter's beyond tolerance (exit 1)."""


@dataclass
class Adapted:
    loaded: object  # models.LoadedModel
    method: object
    adapter: adapter_io.AdapterDir
    task: str
    dtype: str
    base_layout: dict  # parameter name -> (shape, module type) of the base, before the method


def base_model_cfg(adapter: adapter_io.AdapterDir, base: str | None, dtype: str | None) -> ModelCfg:
    meta_base = (adapter.meta or {}).get("base", {})
    name = base or meta_base.get("name_or_path") or adapter.config.get("base_model_name_or_path")
    if not name:
        raise UserError(f"{adapter.path}: the adapter does not name its base model; pass --base MODEL")
    task = meta_base.get("task") or {v: k for k, v in adapter_io.TASK_TYPES.items()}.get(adapter.config.get("task_type"), "causal-lm")
    return ModelCfg(name_or_path=name, gguf_file=meta_base.get("gguf_file") if not base else None, task=task,
                    dtype=dtype or meta_base.get("dtype", "float32"), trust_remote_code=meta_base.get("trust_remote_code", False))


def layout(model) -> dict:
    """Parameter name -> (shape, module type), tied aliases included (a merge may untie them)."""
    types = {n: type(m).__name__ for n, m in model.named_modules(remove_duplicate=False)}
    return {n: (tuple(p.shape), types[n.rpartition(".")[0]]) for n, p in model.named_parameters(remove_duplicate=False)}


def load_adapted(path: str | Path, base: str | None = None, dtype: str | None = None, force: bool = False) -> Adapted:
    """Base model + method + stored tensors, checked against the base the adapter was trained on."""
    from peftcli.models import fingerprint, load_model, quiet_transformers

    quiet_transformers()
    adapter = adapter_io.read_adapter(path)
    cfg = base_model_cfg(adapter, base, dtype)
    method = adapter_io.method_for(adapter)
    meta_base = (adapter.meta or {}).get("base", {})
    loaded = load_model(cfg, label_names=meta_base.get("label_names"))
    expected = meta_base.get("fingerprint")
    new_modules = meta_base.get("new_modules", loaded.new_modules)
    if expected and not force:
        got = fingerprint(loaded.model, exclude=new_modules)
        if got != expected:
            raise UserError(
                f"{cfg.name_or_path} is not the base this adapter was trained on (weights fingerprint {got} != {expected}); "
                "pass the right --base, or --force to merge anyway"
            )
    base_layout = layout(loaded.model)
    method.apply(loaded.model, cfg.task, also_save=new_modules)
    method.load_state_dict(loaded.model, adapter_io.load_tensors(adapter))
    loaded.model.eval()
    return Adapted(loaded, method, adapter, cfg.task, cfg.dtype, base_layout)


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    enc = dict(tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True))
    if getattr(model.config, "is_encoder_decoder", False):  # seq2seq: the decoder reads the probe back, teacher-forced
        enc["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=enc["input_ids"])
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu()


def merge_adapter(path: str | Path, output: str | Path, base: str | None = None, dtype: str | None = None,
                  force: bool = False, overwrite: bool = False, verify: bool | None = None, in_memory: bool = False,
                  progress=None, partial: bool = False) -> dict:
    """Merge `path` into its base and write the model to `output` (atomically: a temp directory renamed
    at the end, removed on any failure). Streams shard by shard (streaming.py) when every part of the
    adapter has a per-tensor merge and the base is safetensors on disk; otherwise, or with
    `in_memory`, loads the model and merges with the method's own `merge`. `verify` (None: when the
    model fits in memory) compares logits of the unmerged adapter and the written model. A method that
    cannot be folded in is refused before anything is loaded or written; `partial` merges a hybrid's
    mergeable parts and writes the rest as an adapter for the merged model (_merge_partial)."""
    from peftcli import streaming

    output = Path(output)
    adapter = adapter_io.read_adapter(path)
    method = adapter_io.method_for(adapter)
    if not method.mergeable and not (partial and hasattr(method, "mergeable_parts")):
        raise UserError(method.merge_refusal())
    if output.exists() and any(output.iterdir() if output.is_dir() else [output]) and not overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite or choose another directory")
    t0 = time.perf_counter()
    if not method.mergeable:
        res = _merge_partial(path, output, base, dtype, force, verify)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        return res
    plan: streaming.Plan | str = "--in-memory"
    prefill = tmp = created = None
    if not in_memory:
        cfg = base_model_cfg(adapter, base, dtype)
        tmp, created = _make_tmp(output)
        try:
            prefill = streaming.start_prefill(adapter, cfg, tmp)  # copies the base while the plan is made
            plan = streaming.plan_merge(adapter, cfg, force, prefill.files if prefill is not None else None)
        except BaseException:
            _cleanup(tmp, created, prefill)
            raise
    t_plan = time.perf_counter() - t0
    if isinstance(plan, str):
        if tmp is not None:
            _cleanup(tmp, created, prefill)
        res = _merge_in_memory(path, output, base, dtype, force, verify)
        res.update(path="in-memory", in_memory_reason=plan)
    else:
        res = _merge_streaming(plan, path, output, base, dtype, force, verify, progress, tmp, created, prefill)
        res["phase_seconds"]["plan"] = round(t_plan, 2)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _fits_in_memory(nbytes: int) -> tuple[bool, int]:
    """Whether loading a model of `nbytes` twice over (unmerged, then the merged reload) leaves room."""
    avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 2 * nbytes + (1 << 30) <= avail, avail


def _make_tmp(output: Path) -> tuple[Path, Path | None]:
    """A temp directory beside `output`, and the first parent directory created for it (removed again
    on failure, so nothing is left behind)."""
    created = next((p for p in reversed([output.parent, *output.parent.parents]) if not p.exists()), None)
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.merge-")), created


def _cleanup(tmp: Path, created: Path | None, prefill=None) -> None:
    """Remove the temp directory (after stopping the early copy into it, if one runs)."""
    if prefill is not None:
        prefill.cancel()
    shutil.rmtree(tmp, ignore_errors=True)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def _compare(before: torch.Tensor, after: torch.Tensor, dtype: str) -> tuple[float, float]:
    max_diff = (after - before).abs().max().item()
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE["float32"])
    tol = atol + rtol * before.abs().max().item()
    if not max_diff <= tol:
        raise MergeMismatch(f"merged logits differ from the adapter's by {max_diff:.3g} > tolerance {tol:.3g} ({dtype}); nothing written")
    return max_diff, tol


def _publish(tmp: Path, output: Path) -> None:
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    os.replace(tmp, output)


def _merge_streaming(plan, path, output: Path, base, dtype, force, verify, progress, tmp: Path, created: Path | None,
                     prefill) -> dict:
    import gc

    from peftcli import streaming
    from peftcli.models import DTYPES, model_class_for

    fits, avail = _fits_in_memory(plan.total_bytes)
    do_verify = fits if verify is None else verify
    before = None
    phases, t = {}, time.perf_counter()
    try:
        if do_verify:  # the unmerged adapter's logits, from the model in memory, freed before the merge
            a = load_adapted(path, base, dtype, force)
            tok = a.loaded.tokenizer
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            before = probe_logits(a.loaded.model, tok)
            del a
            gc.collect()
            phases["verify_load"], t = round(time.perf_counter() - t, 2), time.perf_counter()
        facts = streaming.write_merged(plan, tmp, progress, prefill)
        phases["write"], t = round(time.perf_counter() - t, 2), time.perf_counter()
        max_diff = tol = None
        if do_verify:
            tok = plan.tokenizer
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            reloaded = model_class_for(plan.task).from_pretrained(tmp, dtype=DTYPES.get(plan.dtype, torch.float32)).eval()
            after = probe_logits(reloaded, tok)
            del reloaded
            max_diff, tol = _compare(before, after, plan.dtype)
            phases["verify_reload"] = round(time.perf_counter() - t, 2)
        _publish(tmp, output)
    except BaseException:
        _cleanup(tmp, created, prefill)
        raise
    res = {"output": str(output), "method": plan.method, "dtype": plan.dtype, "max_abs_diff": max_diff, "tolerance": tol,
           "path": "streaming", "verified": do_verify, **facts, "phase_seconds": phases}
    if not do_verify:
        res["verify_skipped"] = ("--no-verify" if verify is False else
                                 f"the model ({plan.total_bytes / 2**30:.1f} GiB) does not fit twice in the available "
                                 f"memory ({avail / 2**30:.1f} GiB); --verify forces it")
    return res


def _merge_in_memory(path, output: Path, base, dtype, force, verify) -> dict:
    from peftcli.models import DTYPES, model_class_for

    a = load_adapted(path, base, dtype, force)  # merge_adapter refused a non-mergeable method already
    do_verify = verify is not False
    model, tok = a.loaded.model, a.loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    before = probe_logits(model, tok) if do_verify else None
    _untie_merged(model, a.method)
    a.method.merge(model)
    merged_layout = layout(model)
    if merged_layout != a.base_layout:
        diff = sorted(set(merged_layout.items()) ^ set(a.base_layout.items()))[:2]
        raise RuntimeError(f"merge left the model's layout changed: {diff}")  # a method bug, not a user error
    tmp, created = _make_tmp(output)
    max_diff = tol = None
    try:
        _save_model(model, tok, tmp, a.task)
        del model, a.loaded.model
        if do_verify:
            reloaded = model_class_for(a.task).from_pretrained(tmp, dtype=DTYPES.get(a.dtype, torch.float32)).eval()
            max_diff, tol = _compare(before, probe_logits(reloaded, tok), a.dtype)
            del reloaded
        _publish(tmp, output)
    except BaseException:
        _cleanup(tmp, created)
        raise
    return {"output": str(output), "method": a.method.name, "dtype": a.dtype, "max_abs_diff": max_diff,
            "tolerance": tol, "verified": do_verify, **({} if do_verify else {"verify_skipped": "--no-verify"})}


def _save_model(model, tok, directory: Path, task: str) -> None:
    """A merged model as transformers reads it: weights (aligned), tokenizer, generation config."""
    _untie_if_changed(model)
    model.save_pretrained(directory, safe_serialization=True)
    for f in directory.glob("*.safetensors"):
        align_safetensors(f)
    tok.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and task == "causal-lm":
        model.generation_config.save_pretrained(directory)


REMAINING = "adapter"  # merge --partial: the parts left unmerged, an adapter directory inside the merged model


def _merge_partial(path, output: Path, base, dtype, force, verify) -> dict:
    """A hybrid's mergeable parts folded into a fresh base, written as a model; the other parts written as
    an adapter directory for that merged model (<output>/adapter). The proof: the merged model reloaded
    from disk with that adapter applied gives the full hybrid's logits, or nothing is written."""
    from peftcli.models import fingerprint, load_model

    a = load_adapted(path, base, dtype, force)
    hybrid, cfg = a.method, base_model_cfg(a.adapter, base, dtype)
    keep, rest = hybrid.mergeable_parts()
    if not keep:
        raise UserError(hybrid.merge_refusal())
    do_verify = verify is not False
    tok = a.loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    before = probe_logits(a.loaded.model, tok) if do_verify else None
    del a.loaded.model
    tensors = adapter_io.load_tensors(a.adapter)
    meta_base = (a.adapter.meta or {}).get("base", {})
    labels = meta_base.get("label_names")

    loaded = load_model(cfg, label_names=labels)  # the mergeable parts alone, on a fresh base, merged
    merged = hybrid.subset(keep)
    merged.apply(loaded.model, cfg.task, also_save=meta_base.get("new_modules", loaded.new_modules))
    merged.load_state_dict(loaded.model, hybrid.part_state(tensors, keep))
    _untie_merged(loaded.model, merged)
    merged.merge(loaded.model)
    if layout(loaded.model) != a.base_layout:
        raise RuntimeError("merge left the model's layout changed")  # a method bug, not a user error
    tmp, created = _make_tmp(output)
    max_diff = tol = None
    try:
        _save_model(loaded.model, tok, tmp, cfg.task)
        del loaded
        # the rest, on the merged model as written (what a user loads), checked against the full hybrid
        again = load_model(ModelCfg(name_or_path=str(tmp), task=cfg.task, dtype=cfg.dtype), label_names=labels)
        fp = fingerprint(again.model)
        remaining = hybrid.subset(rest)
        remaining.apply(again.model, cfg.task)
        remaining.load_state_dict(again.model, hybrid.part_state(tensors, rest))
        again.model.eval()
        if do_verify:
            max_diff, tol = _compare(before, probe_logits(again.model, tok), cfg.dtype)
        names = {"merged": [f"{hybrid.part_key(i)} ({hybrid.parts[i].name})" for i in keep],
                 "remaining": [f"{hybrid.part_key(i)} ({hybrid.parts[i].name})" for i in rest]}
        meta = {"base": {"name_or_path": str(output.resolve()), "task": cfg.task, "dtype": cfg.dtype, "fingerprint": fp,
                         "label_names": labels, "new_modules": []},
                "partial_merge": {"adapter": str(Path(path).resolve()), **names}}
        adapter_io.write_adapter(tmp / REMAINING, remaining, again.model, meta)
        _publish(tmp, output)
    except BaseException:
        _cleanup(tmp, created)
        raise
    return {"output": str(output), "method": hybrid.name, "dtype": cfg.dtype, "max_abs_diff": max_diff, "tolerance": tol,
            "verified": do_verify, "path": "in-memory", **names, "remaining_adapter": str(output / REMAINING),
            **({} if do_verify else {"verify_skipped": "--no-verify"})}


def align_safetensors(path: Path, align: int = 64) -> None:
    """Pad the header so the data section starts on an `align`-byte boundary. Loaders map tensors
    straight from the file (transformers does), and safetensors only aligns to 8 bytes: every weight of
    a merged SmolLM2 sat at a misaligned address and its forward ran 2-5% slower than the base's. The
    format allows trailing spaces in the header; tensor offsets are relative to the data section."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        pad = -(8 + n) % align
        if not pad:
            return
        header = f.read(n)
        tmp = path.with_name(path.name + ".aligning")
        with tmp.open("wb") as g:
            g.write((n + pad).to_bytes(8, "little") + header + b" " * pad)
            shutil.copyfileobj(f, g, 16 << 20)
            g.flush()
            os.fsync(g.fileno())
    os.replace(tmp, path)


def _untie_merged(model, method) -> None:
    """A wrapped module whose weight is shared (GPT-2's lm_head is its token embedding) gets its own
    Parameter object on the same storage before the merge: merging then changes that module only, as
    the adapter did, and _untie_if_changed records the untie in the config."""
    from torch import nn

    users: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        users[id(p)] = users.get(id(p), 0) + 1
    for w in method.wrappers(model).values():
        base = getattr(w, "base_layer", None)
        for name, p in list(base.named_parameters(recurse=False)) if base is not None else []:
            if users.get(id(p), 0) > 1:
                setattr(base, name, nn.Parameter(p.data, requires_grad=p.requires_grad))


def _untie_if_changed(model) -> None:
    """A merge into a tied output head changes the embeddings too; say so in the config rather than
    leave tie_word_embeddings=True over weights that no longer match (a known pain point)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and getattr(model.config, "tie_word_embeddings", False):
        if out.weight.data_ptr() != inp.weight.data_ptr():
            model.config.tie_word_embeddings = False
