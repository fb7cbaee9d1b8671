"""The big-model merge path: fold an adapter into the base's safetensors files one tensor at a time.

For each shard of the base: map it, and for each tensor either copy its bytes unchanged (in the
kernel) or read it, apply the adapter's per-tensor merge (fp32 arithmetic, then the output dtype) and
write it; then the next shard. Resident memory stays at about one tensor (mapped pages are handed back
after each one) plus the adapter; the whole model is never built. Output shards keep the base's names
and layout, with the index file when the base has one.

The structure (which tensors an adapter touches, Linear vs Conv1D orientation, tied weights, shapes)
comes from the model built on the meta device (no memory) with the method applied to it exactly as
the in-memory path does, and the adapter's tensors are checked against it with the method's own
`load_state_dict`. The per-tensor merges below repeat, operation for operation, what each method's
`merged_module` does on the loaded model, so that the output equals the in-memory merge bit for bit.
Methods without one here (HiWi's weight form, SAID/DID, anything new) keep the in-memory path.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftcli import adapter_io
from peftcli.errors import UserError, one_line
from peftcli.shards import ALIGN, MappedFile, OutEntry, ShardWriter, TensorInfo, read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Edit:
    """How the merge changes one base tensor: `replace` (a stored value: modules_to_save, BitFit and
    HiWi biases) or `modify` (a function of the base tensor: LoRA, DoRA, IA3, AdaLoRA)."""

    kind: str
    value: torch.Tensor | None = None  # replace
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # modify


def tensor_edits(method, model, stored: dict[str, torch.Tensor]) -> dict[str, Edit] | str:
    """The per-tensor merge of an adapter: {base parameter name: Edit}, from the method as applied to
    `model` (the meta-device skeleton, adapter already checked against it) and the stored tensors: each
    wrapper's `tensor_merges`, the method's `replaced_tensors` and modules_to_save. A string instead says
    why this adapter has no per-tensor merge (the in-memory path then merges it)."""
    from peftcli.methods.base import PREFIX

    if not method.streams:
        return f"method {method.name!r} has no per-tensor merge"
    used: set[str] = set()
    edits: dict[str, Edit] = {}
    for path, w in method.wrappers(model).items():

        def get(local: str, _k=f"{PREFIX}{path}") -> torch.Tensor:
            used.add(f"{_k}.{local}")
            return stored[f"{_k}.{local}"]

        merges = w.tensor_merges(get)
        if isinstance(merges, str):
            return f"{path}: {merges}"
        for local, (kind, x) in merges.items():
            edits[f"{path}.{local}"] = Edit(kind, value=x) if kind == "replace" else Edit(kind, fn=x)
    replaced = list(method.replaced_tensors(model))
    for path in method.saved_modules:
        replaced += [f"{path}.{local}" for local, _ in model.get_submodule(path).named_parameters()]
    for name in replaced:
        if name in edits:
            return f"{name} is both replaced and merged"
        edits[name] = Edit("replace", value=stored[f"{PREFIX}{name}"])
        used.add(f"{PREFIX}{name}")
    left = sorted(set(method.state_dict(model)) - used)
    if left:  # a safety net: every stored tensor must have been folded somewhere
        return f"adapter tensor {left[0]} has no per-tensor merge"
    return edits


def _streams(name: str | None) -> bool:
    """Whether the registered method `name` has a per-tensor merge (decided before building anything)."""
    from peftcli.methods import available_methods, get_method

    return name in available_methods() and get_method(name).streams


# ---------------------------------------------------------------- the base's files

@dataclass
class BaseFiles:
    dir: Path
    headers: dict[str, dict[str, TensorInfo]]  # file name -> its tensors
    where: dict[str, str]  # tensor name -> file name
    index: Path | None  # the index file, for sharded models


def base_files(model_dir: Path) -> BaseFiles | None:
    """The base's safetensors files with checked headers; None when it has none (the in-memory path
    reads .bin / GGUF). A bad index, a shard it lists that is missing, or a truncated file is a UserError."""
    single, index = model_dir / SINGLE, model_dir / INDEX
    if single.is_file():
        headers = {SINGLE: read_header(single)[0]}
        return BaseFiles(model_dir, headers, dict.fromkeys(headers[SINGLE], SINGLE), None)
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except OSError as exc:
        raise UserError(f"{index}: cannot read ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{index}: not a safetensors index (needs a JSON object with a \"weight_map\" of tensor -> file); "
                        "re-download or re-save the base model") from None
    headers = {}
    for name in sorted(set(weight_map.values())):
        shard = model_dir / name
        if Path(name).name != name or not shard.is_file():
            raise UserError(f"{index}: lists shard {one_line(name, 120)}, which is missing from {model_dir}; "
                            "re-download or re-save the base model")
        headers[name] = read_header(shard)[0]
    for key, name in weight_map.items():
        if key not in headers[name]:
            raise UserError(f"{index}: maps {one_line(key, 120)} to {name}, which does not contain it; "
                            "re-download or re-save the base model")
    return BaseFiles(model_dir, headers, dict(weight_map), index)


def local_model_dir(cfg) -> Path | str:
    """The base's local directory, or why there is none."""
    from peftcli.models import resolve_path

    path, gguf = resolve_path(cfg)
    if gguf:
        return "the base model is a GGUF file"
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:
        return f"{path} is not a local directory or a cached hub model"


# ---------------------------------------------------------------- the plan

@dataclass
class Job:
    """One output tensor: where its base value comes from and what the merge does to it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str | None = None  # source in the base (None: a new module's tensor, from the adapter)
    key: str | None = None
    replace: torch.Tensor | None = None
    modify: Callable | None = None


@dataclass
class Plan:
    files: BaseFiles
    config: object  # the transformers config to write
    tokenizer: object
    generation_config: object | None
    task: str
    dtype: str
    method: str
    shards: dict[str, list[Job]] = field(default_factory=dict)  # output file -> its tensors
    untied: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(j.dtype.itemsize * _numel(j.shape) for jobs in self.shards.values() for j in jobs)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _model_dtype(name: str, config, files: BaseFiles) -> torch.dtype | None:
    if name in DTYPES:
        return DTYPES[name]
    # "auto": the config's dtype, else the checkpoint's first floating tensor (transformers' rule)
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    if isinstance(d, torch.dtype):
        return d
    for h in files.headers.values():
        for info in h.values():
            if info.dtype.is_floating_point:
                return info.dtype
    return None


def _key_map(keys: list[str], where: dict[str, str], prefix: str) -> dict[str, str]:
    """Model state-dict name -> checkpoint name: the same, or differing by the base-model prefix
    (a `LlamaModel` checkpoint under `LlamaForSequenceClassification`, and the reverse)."""
    out = {}
    for k in keys:
        if k in where:
            out[k] = k
        elif prefix and k.startswith(prefix + ".") and k[len(prefix) + 1:] in where:
            out[k] = k[len(prefix) + 1:]
        elif prefix and f"{prefix}.{k}" in where:
            out[k] = f"{prefix}.{k}"
    return out


def plan_merge(adapter: adapter_io.AdapterDir, cfg, force: bool = False, files: BaseFiles | None = None) -> Plan | str:
    """Everything the streaming merge needs, checked before a byte is written: the base's files,
    shapes against its config, the fingerprint, the adapter against the model. Returns the reason as
    a string where this merge needs the in-memory path; raises UserError for bad input. `files`: the
    base's checked headers when the caller has read them already (the early copy)."""
    from peftcli.models import load_tokenizer, model_class_for, quiet_transformers

    quiet_transformers()
    model_dir = local_model_dir(cfg)
    if isinstance(model_dir, str):
        return model_dir
    files = files or base_files(model_dir)
    if files is None:
        return f"{model_dir} has no safetensors weights"
    name = (adapter.options.name if adapter.options is not None else None) or "?"
    if not _streams(name):
        return f"method {name!r} has no per-tensor merge"
    meta_base = (adapter.meta or {}).get("base", {})
    config = _load_config(model_dir, cfg, meta_base.get("label_names"))
    with torch.device("meta"):
        try:
            model = model_class_for(cfg.task).from_config(config, trust_remote_code=cfg.trust_remote_code)
        except Exception as exc:  # an architecture transformers cannot build from this config
            return f"cannot build {getattr(config, 'model_type', '?')} on the meta device ({one_line(exc, 100)})"
    dtype = _model_dtype(cfg.dtype, config, files)
    if dtype not in DTYPES.values():
        return f"model dtype {dtype} (the in-memory path keeps it)"
    if getattr(model, "_keep_in_fp32_modules", None) and dtype != torch.float32:
        return f"{type(model).__name__} keeps some modules in float32 when loaded in {dtype}"

    # the base layout, before the method changes the skeleton
    sd = model.state_dict()
    keymap = _key_map(list(sd), files.where, getattr(model, "base_model_prefix", ""))
    by_param: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(n)
    groups = [g for g in by_param.values() if len(g) > 1]
    emb = {_weight_name(model, model.get_input_embeddings()), _weight_name(model, model.get_output_embeddings())}
    alias = {n: g for g in groups for n in g}
    source: dict[str, str] = {}  # model name -> checkpoint name holding its value
    for k in sd:
        if k in keymap:
            source[k] = keymap[k]
        else:
            held = [m for m in alias.get(k, []) if m in keymap]
            if held:
                source[k] = keymap[held[0]]
    for k, ck in source.items():
        info = files.headers[files.where[ck]][ck]
        if info.shape != tuple(sd[k].shape):
            raise UserError(f"{model_dir / files.where[ck]}: tensor {ck} has shape {list(info.shape)}, but the model's "
                            f"config.json gives {k} the shape {list(sd[k].shape)}; the weights do not match the config")
    missing = [k for k in sd if k not in source]
    new_modules = meta_base.get("new_modules")
    if new_modules is None:
        new_modules = sorted({k.rsplit(".", 1)[0] for k in missing if "." in k})
    expected = meta_base.get("fingerprint")
    if expected and not force:
        got = files_fingerprint(files, sd, source, dtype, new_modules)
        if got is None:
            return "the base checkpoint lacks tensors that the fingerprint covers"
        if got != expected:
            raise UserError(f"{cfg.name_or_path} is not the base this adapter was trained on (weights fingerprint {got} != "
                            f"{expected}); pass the right --base, or --force to merge anyway")

    # the method on the skeleton, and the adapter's tensors checked against it (the in-memory checks)
    method = adapter_io.method_for(adapter)
    stored = adapter_io.load_tensors(adapter)
    try:
        method.apply(model, cfg.task, also_save=new_modules)
        _materialize_adapters(method, model)
        method.load_state_dict(model, stored)
    except UserError as exc:
        arch = f"{getattr(config, 'model_type', '?')}, hidden size {getattr(config, 'hidden_size', '?')}"
        raise UserError(f"adapter {adapter.path} does not fit the base {cfg.name_or_path} ({arch}): {exc}") from None
    if not method.mergeable:
        raise UserError(method.merge_refusal())
    edits = tensor_edits(method, model, stored)
    if isinstance(edits, str):
        return edits
    unknown = [k for k in edits if k not in sd]
    if unknown:
        return f"the merge writes {unknown[0]}, which is not in the model's state dict"
    lacking = [k for k in missing if not (k in edits and edits[k].kind == "replace")
               and not any(m in edits and edits[m].kind == "replace" for m in alias.get(k, []))]
    if lacking:
        return f"the base checkpoint lacks {lacking[0]} (the in-memory path initialises it)"

    # tied tensors: a stored value (modules_to_save) is the shared parameter's, as in the loaded model;
    # a merge into one of them changes that one only, so the output unties them.
    untied: list[str] = []
    for g in groups:
        mods = [k for k in g if k in edits and edits[k].kind == "modify"]
        if not mods:
            continue
        if set(g) != emb or not getattr(config, "tie_word_embeddings", False):
            raise UserError(f"the merge changes {mods[0]}, which this architecture ties to "
                            f"{', '.join(k for k in g if k != mods[0])}; it cannot be untied: merge in memory (--in-memory) "
                            "or leave the tied module out of the adapter's targets")
        untied = g
        config.tie_word_embeddings = False
    config.architectures = [type(model).__name__]  # as save_pretrained writes it
    plan = Plan(files, config, load_tokenizer(cfg), _generation_config(model_dir, model, cfg.task), cfg.task,
                str(dtype).removeprefix("torch."), method.name, untied=untied)
    if getattr(config, "pad_token_id", None) is None and plan.tokenizer.pad_token_id is not None:
        config.pad_token_id = plan.tokenizer.pad_token_id  # as models.load_model does
    _assign_jobs(plan, sd, source, alias, edits, untied, dtype)
    return plan


def _materialize_adapters(method, model) -> None:
    """The wrappers' own parameters and buffers on the CPU (adapter-sized), the base layers left on the
    meta device: load_state_dict then runs as on a loaded model (AdaLoRA reads its rank mask). Values
    are placeholders (zeros; boolean masks all set, as AdaLoRA's init) until the stored tensors load."""
    from torch import nn

    for w in method.wrappers(model).values():
        for mod_name, mod in w.named_modules():
            if mod_name == "base_layer" or mod_name.startswith("base_layer."):
                continue
            for name, p in list(mod.named_parameters(recurse=False)):
                if p.is_meta:
                    setattr(mod, name, nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=p.requires_grad))
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.is_meta:
                    fill = torch.ones if b.dtype == torch.bool else torch.zeros
                    mod._buffers[name] = fill(b.shape, dtype=b.dtype)


def _weight_name(model, module) -> str | None:
    """`<module path>.weight` of `module` (by module identity: tied modules share their weight)."""
    if module is None:
        return None
    return next((f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is module), None)


def _load_config(model_dir: Path, cfg, label_names):
    from transformers import AutoConfig

    kw = {}
    if cfg.task == "seq-cls":  # what models.load_model passes to from_pretrained
        labels = label_names or [str(i) for i in range(getattr(cfg, "num_labels", None) or 2)]
        kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code, **kw)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.name_or_path: cannot load {model_dir}: {one_line(first, 200)}") from None


def _generation_config(model_dir: Path, model, task: str):
    if task != "causal-lm":
        return None
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(model_dir)
        except (OSError, ValueError):
            pass
    return getattr(model, "generation_config", None)


def _assign_jobs(plan: Plan, sd: dict, source: dict[str, str], alias: dict, edits: dict[str, Edit], untied: list[str],
                 dtype: torch.dtype) -> None:
    """Output tensors (the names the loaded model saves: tied aliases once unless untied) into the
    shards of their base values, in base-file order; new modules' tensors go to the last shard."""
    files = plan.files
    seen_groups: set[int] = set()
    jobs: dict[str, list[Job]] = {f: [] for f in files.headers}
    for k, t in sd.items():
        g = alias.get(k)
        if g and not (untied and k in untied):
            if id(g) in seen_groups:
                continue  # a tied alias: saved once, under the first name
            seen_groups.add(id(g))
        out_dtype = dtype if t.is_floating_point() else t.dtype
        job = Job(k, out_dtype, tuple(t.shape))
        members = g if g else [k]
        rep = next((edits[m] for m in members if m in edits and edits[m].kind == "replace"), None)
        if rep is not None:
            job.replace = rep.value
        elif k in source:
            job.key = source[k]
        if k in edits and edits[k].kind == "modify":  # a tied group with a merged member is untied (plan_merge)
            job.modify = edits[k].fn
        job.file = files.where[source[k]] if k in source else sorted(files.headers)[-1]
        jobs[job.file].append(job)
    for f, js in jobs.items():
        pos = {name: info.begin for name, info in files.headers[f].items()}
        js.sort(key=lambda j: pos.get(j.key, float("inf")) if j.replace is None else float("inf"))
    plan.shards = jobs


def files_fingerprint(files: BaseFiles, sd: dict, source: dict[str, str], dtype: torch.dtype, exclude) -> str | None:
    """models.fingerprint of the model as it would load, computed from the mapped files (a strided
    sample of each tensor only): the same names, order, shapes and bf16-rounded samples."""
    import hashlib

    h = hashlib.sha256()
    handles: dict[str, MappedFile] = {}
    try:
        for name, p in sd.items():
            if not p.is_floating_point() or any(name.startswith(e + ".") for e in exclude):
                continue
            if name not in source:
                return None
            ck = source[name]
            f = files.where[ck]
            if f not in handles:
                handles[f] = MappedFile(files.dir / f, files.headers[f])
            step = max(1, p.numel() // 512)
            sample = handles[f].sample(ck, step, 512).to(dtype).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            h.update(name.encode() + str(tuple(p.shape)).encode() + sample)
    finally:
        for m in handles.values():
            m.close()
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- execution

def write_merged(plan: Plan, out: Path, progress: Callable[[str, int, int], None] | None = None,
                 prefill: Prefill | None = None) -> dict:
    """Write the merged shards, the index (sharded bases), config, generation config and tokenizer into
    `out` (an empty temp directory, or the one `prefill` copies into; the caller renames it). Returns
    facts for the report."""
    from peftcli.shards import WritePipe

    files = plan.files
    total = len(plan.shards)
    patch = prefill is not None and prefill.fits(plan)
    if prefill is not None and not patch:
        prefill.cancel(remove=True)  # another layout (dtype change, untied head, new modules): written afresh
    pipe = WritePipe()  # writes and fsyncs overlap the next tensors' merge arithmetic
    writers: list[ShardWriter] = []
    try:
        if patch:
            prefill.join()
        for i, (fname, jobs) in enumerate(plan.shards.items(), 1):
            if progress:
                progress(fname, i, total)
            if patch:
                _patch_shard(files, fname, jobs, out / fname, pipe, prefill.copied[fname], prefill.shift[fname])
            else:
                _write_shard(files, fname, jobs, out / fname, pipe, writers)
        pipe.close()
    except BaseException:
        pipe.close(raise_errors=False)
        if prefill is not None:
            prefill.cancel()
        for w in writers:
            w.abort()
        raise
    if files.index is not None:
        weight_map = {j.name: f for f, jobs in plan.shards.items() for j in jobs}
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    cfg = plan.config
    cfg.dtype = plan.dtype
    cfg.save_pretrained(out)
    if plan.generation_config is not None:
        plan.generation_config.save_pretrained(out)
    plan.tokenizer.save_pretrained(out)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"shards": total, "bytes": plan.total_bytes, "untied": plan.untied,
            "layout": "base layout, unchanged tensors copied while planning" if patch else "rewritten"}


def _merged(j: Job, src: MappedFile | None) -> torch.Tensor:
    """The output value of a replaced or modified tensor."""
    w = j.replace.to(j.dtype) if j.replace is not None else src.get(j.key).to(j.dtype)
    return j.modify(w) if j.modify is not None else w


def _write_shard(files: BaseFiles, fname: str, jobs: list[Job], path: Path, pipe, writers: list) -> None:
    src = MappedFile(files.dir / fname, files.headers[fname]) if fname in files.headers else None
    writer = ShardWriter(path, [OutEntry(j.name, j.dtype, j.shape) for j in jobs], pipe=pipe)
    writers.append(writer)
    by_name = {j.name: j for j in jobs}
    try:
        for entry in writer.order:
            j = by_name[entry.name]
            if j.replace is None and j.modify is None and src.tensors[j.key].dtype == j.dtype:
                writer.copy_from(j.name, src, j.key)
                continue
            writer.write_tensor(j.name, _merged(j, src))
            if j.key is not None and j.replace is None:
                src.release(j.key)
        writer.finish()
    finally:
        if src is not None:
            pipe.put(src.close)  # after the pipe's pending copies from it


# ---------------------------------------------------------------- copying while planning

class Prefill:
    """Most of a merge's output is the base's bytes unchanged, and most of its fixed cost is planning
    (importing transformers, building the skeleton, the fingerprint). So as soon as the base's files
    and the adapter's tensor names are known, a thread copies every shard into the output directory in
    the kernel, header and layout unchanged, leaving holes where the adapter's modules' tensors go. If
    the plan keeps the base's layout (same tensors, names and dtypes in each file), the merge then only
    writes the merged tensors into their holes (`_patch_shard`); otherwise the copies are deleted and
    the shards are written afresh. The guess only decides what is copied early: whatever the plan says
    is unchanged but was not copied is copied then, so a wrong guess costs time, never correctness.
    The header is copied verbatim but padded with spaces so the data starts 64-byte aligned, as the
    fresh writer lays it out (tensor offsets are relative to the data section)."""

    def __init__(self, files: BaseFiles, out: Path, skip: set[str]):
        import threading

        self.files, self.out = files, out
        self.copied: dict[str, set[str]] = {f: set() for f in files.headers}
        self.shift: dict[str, int] = dict.fromkeys(files.headers, 0)  # output offset - base offset
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(skip,), name="prefill", daemon=True)
        self._thread.start()

    def _run(self, skip: set[str]) -> None:
        from peftcli.shards import Cancelled, copy_range

        try:
            for fname, tensors in self.files.headers.items():
                runs = _runs([(info.begin, info.end, name) for name, info in tensors.items() if name not in skip])
                with open(self.files.dir / fname, "rb") as src, open(self.out / fname, "wb") as dst:
                    size = os.fstat(src.fileno()).st_size
                    n = int.from_bytes(src.read(8), "little")
                    shift = self.shift[fname] = -(8 + n) % ALIGN  # the header padded: data 64-byte aligned
                    dst.write((n + shift).to_bytes(8, "little") + src.read(n) + b" " * shift)
                    os.ftruncate(dst.fileno(), size + shift)  # the holes read as zeros until patched
                    for begin, end, names in runs:
                        copy_range(src.fileno(), dst.fileno(), begin, end, begin + shift, stop=self._stop)
                        self.copied[fname].update(names)
        except Cancelled:
            pass
        except BaseException as exc:  # reported by join()
            self._error = exc

    def fits(self, plan: Plan) -> bool:
        """Whether the plan writes each base file with its own tensors, names, shapes and dtypes."""
        if set(plan.shards) != set(self.files.headers):
            return False
        for fname, jobs in plan.shards.items():
            header = self.files.headers[fname]
            if len(jobs) != len(header):
                return False
            for j in jobs:
                info = header.get(j.name)
                if info is None or j.key != j.name or j.file != fname or info.dtype != j.dtype or info.shape != j.shape:
                    return False
        return True

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self, remove: bool = False) -> None:
        self._stop.set()
        self._thread.join()
        if remove:
            for fname in self.files.headers:
                (self.out / fname).unlink(missing_ok=True)


def _runs(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, list[str]]]:
    """Adjacent byte ranges joined: one copy call per run of unchanged tensors."""
    out: list[tuple[int, int, list[str]]] = []
    for b, e, name in sorted(spans):
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], e, out[-1][2] + [name])
        else:
            out.append((b, e, [name]))
    return out


def start_prefill(adapter: adapter_io.AdapterDir, cfg, out: Path) -> Prefill | None:
    """The early copy for a merge of `adapter` into `cfg`'s base, or None where it cannot apply (no
    local safetensors base, a method without a per-tensor merge, an output dtype other than the
    files', a legacy .bin adapter). Skips the base tensors of every module the adapter stores tensors
    for (its targets and modules_to_save)."""
    from peftcli.shards import read_header

    name = adapter.options.name if adapter.options is not None else None
    if not _streams(name) or adapter.weights.name != adapter_io.WEIGHTS:
        return None
    model_dir = local_model_dir(cfg)
    if isinstance(model_dir, str) or (files := base_files(model_dir)) is None:
        return None
    want = DTYPES.get(cfg.dtype)
    if want is None and cfg.dtype == "auto":
        try:
            conf = json.loads((model_dir / "config.json").read_text())
            want = getattr(torch, str(conf.get("dtype") or conf.get("torch_dtype")), None)
        except (OSError, ValueError):
            return None
    floats = {i.dtype for h in files.headers.values() for i in h.values() if i.dtype.is_floating_point}
    if want is not None and floats - {want}:
        return None
    return Prefill(files, out, _guess_changed(read_header(adapter.weights)[0], files))


def _guess_changed(adapter_keys, files: BaseFiles) -> set[str]:
    """Base tensors the merge probably rewrites: those whose module is a module of the adapter or
    contains one (the `q_proj` of `q_proj.lora_A.weight`, the `q_proj` of BitFit's `q_proj.bias`)."""
    from peftcli.methods.base import PREFIX

    owners = set()
    for k in adapter_keys:
        parts = k.removeprefix(PREFIX).split(".")
        owners.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return {n for n in files.where if n.rpartition(".")[0] in owners}


def _patch_shard(files: BaseFiles, fname: str, jobs: list[Job], path: Path, pipe, copied: set[str], shift: int) -> None:
    """Write the merged tensors of one prefilled shard into their own byte ranges, copy what the
    prefill left out but the plan leaves unchanged, then fsync (on the pipe, after the writes)."""
    from peftcli.shards import copy_range

    header = files.headers[fname]
    src = MappedFile(files.dir / fname, header)
    fd = os.open(path, os.O_WRONLY)

    def write_at(data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def close() -> None:
        os.fsync(fd)
        os.close(fd)
        src.close()

    try:
        for j in sorted(jobs, key=lambda j: header[j.key].begin):
            info = header[j.key]
            if j.replace is not None or j.modify is not None:
                data = _merged(j, src).contiguous().reshape(-1).view(torch.uint8).numpy()
                pipe.put(functools.partial(write_at, data, info.begin + shift))
                src.release(j.key)
            elif j.key not in copied:
                pipe.put(functools.partial(copy_range, src.fileno(), fd, info.begin, info.end, info.begin + shift))
    finally:
        pipe.put(close)
