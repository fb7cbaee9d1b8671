"""Streaming merge on a generated sharded model (issue 9, section 2): peak RSS against the largest shard,
wall time against `cp` of the same bytes on the same disk, and the output bit for bit against the
in-memory merge.

    python -m bench.stream_merge                # = make bench-merge-stream (~10 min on 2 cores)
    python -m bench.stream_merge --quick        # small model, 1 repeat (smoke)
    python -m bench.stream_merge --size large   # 7.2 GB in 1 GB shards (no verified / in-memory rows: 2x the model)

The model is Llama-shaped with random fp32 weights, written once under bench/work/stream-merge/ (one
tensor at a time, so generating it needs no more memory than the merge) and reused by later runs;
the adapter is a random LoRA (r 16, all linear layers) for it. Every measured command is a fresh
process (peak RSS from wait4, exact); cp and merge alternate. Results: bench/results/merge_stream.json
and bench/results/MERGE_STREAM.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

from bench.common import BENCH, ROOT, machine_info, median, run_measured, versions

PY = sys.executable
SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab, shard MB
    "full": (1536, 4096, 16, 12, 4, 32000, 250),
    "quick": (512, 1408, 4, 8, 4, 32000, 40),
    "large": (3072, 8192, 16, 24, 8, 32000, 1000),  # 7.2 GB: where a real model's size amortises the start-up
}


def peftcli_cmd() -> list[str]:
    exe = Path(PY).parent / "peftcli"
    return [str(exe)] if exe.is_file() else [PY, "-m", "peftcli"]


def rel(p: Path) -> str:
    p = Path(p)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def make_base(d: Path, size: str) -> dict:
    """A sharded Llama-shaped fp32 model with random weights, its index, config, tokenizer and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peftcli.shards import OutEntry, ShardWriter

    hidden, inter, layers, heads, kv, vocab, shard_mb = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    entries = [OutEntry(k, torch.float32, tuple(t.shape)) for k, t in model.state_dict().items()]
    shards, cur, size_b = [], [], 0
    for e in entries:  # greedy, in state-dict order, as save_pretrained packs
        if cur and size_b + e.nbytes > shard_mb * 10**6:
            shards.append(cur)
            cur, size_b = [], 0
        cur.append(e)
        size_b += e.nbytes
    shards.append(cur)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    n = len(shards)
    for i, group in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        w = ShardWriter(tmp / name, group)
        for e in w.order:
            t = torch.ones(e.shape) if e.name.endswith("norm.weight") else torch.randn(e.shape, generator=g) * 0.02
            w.write_tensor(e.name, t)
            weight_map[e.name] = name
        w.finish()
    total = sum(e.nbytes for e in entries)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    _tokenizer().save_pretrained(tmp)
    tmp.rename(d)
    return {"params": sum(e.nbytes for e in entries) // 4, "bytes": total, "shards": n}


def _tokenizer():
    from transformers import AutoTokenizer

    from bench.common import minilm_location

    tok = AutoTokenizer.from_pretrained(minilm_location())  # a WordPiece vocabulary (30522 < 32000 ids)
    tok.eos_token = "[SEP]"
    return tok


ADAPTERS = {  # name -> LoRA target_modules
    "all-linear": "all-linear",  # the worst case: every linear weight is read, merged and rewritten
    "q,v": ["q_proj", "v_proj"],  # HF PEFT's default for Llama: most bytes are copied unchanged
}


def make_adapter(base: Path, d: Path, targets: str) -> dict:
    """A random LoRA (r 16, alpha 32) on `targets` for `base`, with its weights fingerprint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftcli import adapter_io, streaming
    from peftcli.methods import build_method

    cfg = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    files = streaming.base_files(base)
    sd = model.state_dict()
    source = streaming._key_map(list(sd), files.where, model.base_model_prefix)
    fp = streaming.files_fingerprint(files, sd, source, torch.float32, [])
    method = build_method({"name": "lora", "r": 16, "alpha": 32, "target_modules": ADAPTERS[targets]})
    method.apply(model)
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in method.state_dict(model).items()}
    meta = {"base": {"name_or_path": str(base), "task": "causal-lm", "dtype": "float32", "fingerprint": fp}}
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter_io.write_adapter(tmp, method, model, meta, tensors=tensors)
    tmp.rename(d)
    return {"adapter_bytes": (d / adapter_io.WEIGHTS).stat().st_size, "targets": len(method.wrapped)}


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor (one at a time): same names, dtypes, shapes and bytes."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as s:
                out.update(dict.fromkeys(s.keys(), f))  # noqa: SIM118
        return out

    wa, wb = where(a), where(b)
    res = {"tensors": len(wa), "same_names": wa.keys() == wb.keys(), "differing": []}
    for k in sorted(wa.keys() & wb.keys()):
        with safe_open(str(wa[k]), "pt") as fa, safe_open(str(wb[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            res["differing"].append(k)
    res["bit_identical"] = res["same_names"] and not res["differing"]
    return res


def merge_json(log: str) -> dict:
    """The --json report a merge printed (its stdout, inside the run's log)."""
    lines = (ROOT / log).read_text(errors="replace").splitlines()
    try:
        start = lines.index("{")
        return json.loads("\n".join(lines[start:lines.index("}", start) + 1]))
    except ValueError:
        return {}


def run_step(log: Path, *args: str) -> None:
    """One of the jobs that need torch, in a child process: the orchestrator stays free of torch, so the
    measured processes it forks do not inherit its resident memory into their peak RSS (Linux keeps a
    process's RSS high-water mark across fork and exec)."""
    r = run_measured([PY, "-m", "bench.stream_merge", "--step", *args], log)
    if r["rc"]:
        raise SystemExit(f"bench: step {args[0]} failed; see {r['log']}")


def child_step(args: list[str]) -> int:
    if args[0] == "make-base":
        make_base(Path(args[1]), args[2])
    elif args[0] == "make-adapter":
        make_adapter(Path(args[1]), Path(args[2]), args[3])
    elif args[0] == "compare":
        Path(args[3]).write_text(json.dumps(compare(Path(args[1]), Path(args[2]))))
    else:
        raise SystemExit(f"unknown step {args[0]}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~90 MB model, one repeat (smoke)")
    p.add_argument("--size", choices=list(SIZES), default="full", help="model size (default full, 2 GB; large: 7.2 GB)")
    p.add_argument("--repeats", type=int, help="runs of cp and of the streaming merge, alternating (default 3; quick 1)")
    p.add_argument("--out", default=str(BENCH / "results"), help="results folder (default bench/results)")
    p.add_argument("--work", default=str(BENCH / "work" / "stream-merge"))
    p.add_argument("--no-in-memory", action="store_true", help="skip the in-memory merge (bit-identity and its RSS)")
    p.add_argument("--step", nargs="+", help=argparse.SUPPRESS)  # internal: a child process's job
    a = p.parse_args(argv)
    if a.step:
        return child_step(a.step)
    size = "quick" if a.quick else a.size
    big = size == "large"  # the runs that hold the model in memory (twice when verified) are left out
    repeats = a.repeats or (1 if a.quick else 3)
    work, out = Path(a.work).resolve() / size, Path(a.out).resolve()
    raw = work / "logs"
    base = work / "base"
    adapters = {k: work / f"adapter-{k.replace(',', '')}" for k in ADAPTERS}
    t0 = time.time()
    if not (base / "config.json").is_file():
        print(f"generating the {size} model in {rel(base)} ...", flush=True)
        run_step(raw / "make-base.log", "make-base", str(base), size)
    for k, d in adapters.items():
        if not (d / "adapter_model.safetensors").is_file():
            run_step(raw / f"make-adapter-{k}.log", "make-adapter", str(base), str(d), k)
    shards = sorted(base.glob("*.safetensors"))
    shard_bytes = [f.stat().st_size for f in shards]
    total = sum(shard_bytes)
    adapter_bytes = {k: (d / "adapter_model.safetensors").stat().st_size for k, d in adapters.items()}
    print(f"base: {len(shards)} shards, {total / 1e6:.0f} MB (largest {max(shard_bytes) / 1e6:.0f} MB); adapters "
          + ", ".join(f"{k} {b / 1e6:.1f} MB" for k, b in adapter_bytes.items()), flush=True)

    def run(name: str, cmd: list[str]) -> dict:
        r = run_measured(cmd, raw / f"{name}.log")
        print(f"  {name}: rc {r['rc']}, {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        if r["rc"]:
            raise SystemExit(f"bench: {name} failed; see {r['log']}")
        return r

    copy_dir, stream_dir, mem_dir = work / "cp", work / "streamed", work / "in-memory"
    cp = f'mkdir -p "{copy_dir}" && cp --reflink=never "{base}"/*.safetensors "{copy_dir}"/'
    sides = {"cp": (["sh", "-c", cp], copy_dir), "cp+sync": (["sh", "-c", f'{cp} && sync "{copy_dir}"/*.safetensors'], copy_dir)}
    for k, d in adapters.items():
        sides[f"stream {k}"] = (peftcli_cmd() + ["merge", str(d), "-o", str(stream_dir), "--no-verify", "--json"], stream_dir)
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    # the floor: a process importing what the merge imports, before it touches any weights
    floor = run("floor", [PY, "-c", "import peftcli.cli, peftcli.merge, peftcli.streaming; "
                                    "from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM"])
    run("warm-cache", ["sh", "-c", f'cat "{base}"/*.safetensors > /dev/null'])  # every side reads from the page cache
    for i in range(repeats):  # the sides alternate: cp, cp+sync, stream ..., cp, ...
        for side, (cmd, d) in sides.items():
            shutil.rmtree(d, ignore_errors=True)
            r = run(f"{side.replace(' ', '-').replace(',', '')}-{i}", cmd)
            if side.startswith("stream"):
                r["phase_seconds"] = merge_json(r["log"]).get("phase_seconds")
            runs[side].append(r)
    shutil.rmtree(copy_dir, ignore_errors=True)
    worst = adapters["all-linear"]
    verified = None
    if not big:
        verified = run("stream-verified", peftcli_cmd() + ["merge", str(worst), "-o", str(work / "verified"), "--json"])
        shutil.rmtree(work / "verified", ignore_errors=True)
    in_memory = identity = None
    if not (a.no_in_memory or big):  # the all-linear streamed output against the in-memory merge
        shutil.rmtree(stream_dir, ignore_errors=True)
        run("stream-for-identity", sides["stream all-linear"][0])
        shutil.rmtree(mem_dir, ignore_errors=True)
        in_memory = run("in-memory", peftcli_cmd() + ["merge", str(worst), "-o", str(mem_dir), "--no-verify", "--in-memory"])
        run_step(raw / "compare.log", "compare", str(stream_dir), str(mem_dir), str(work / "identity.json"))
        identity = json.loads((work / "identity.json").read_text())
        print(f"  streamed vs in-memory: {'bit-identical' if identity['bit_identical'] else 'DIFFERENT'} "
              f"({identity['tensors']} tensors)", flush=True)
        shutil.rmtree(mem_dir, ignore_errors=True)
    shutil.rmtree(stream_dir, ignore_errors=True)

    med = {k: median([r["wall_s"] for r in v]) for k, v in runs.items()}
    peak = {k: median([r["peak_rss_mb"] for r in runs[f"stream {k}"]]) for k in adapters}
    largest = max(shard_bytes) / 2**20
    fl = floor["peak_rss_mb"]
    res = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "invocation": " ".join(["python -m bench.stream_merge", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "versions": versions(),
        "model": {"size": size, "shape": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "shard_mb"),
                                                  SIZES[size], strict=True)),
                  "dtype": "float32", "shards": len(shards), "bytes": total, "shard_bytes": shard_bytes,
                  "largest_shard_bytes": max(shard_bytes)},
        "adapters": {k: {"lora": f"r 16, alpha 32, target_modules {ADAPTERS[k]} (random weights)", "bytes": adapter_bytes[k]}
                     for k in adapters},
        "repeats": repeats, "runs": runs, "median_wall_s": med, "floor_rss_mb": fl, "peak_rss_mb": peak,
        "stream_verified_all_linear": verified, "in_memory_all_linear": in_memory, "bit_identity_all_linear": identity,
        "ratios": {k: {"peak_rss_over_largest_shard": peak[k] / largest,
                       "peak_rss_above_floor_over_largest_shard": (peak[k] - fl) / largest,
                       "wall_over_cp_sync": med[f"stream {k}"] / med["cp+sync"],
                       "wall_over_cp": med[f"stream {k}"] / med["cp"],
                       # the merge's own work: its wall time less the floor process's (interpreter + imports)
                       "wall_less_startup_over_cp_sync": (med[f"stream {k}"] - floor["wall_s"]) / med["cp+sync"],
                       # the data phase alone (reading, merging, writing and fsyncing the shards), as the merge reports it
                       "write_phase_over_cp_sync": median([(x.get("phase_seconds") or {}).get("write", float("nan"))
                                                           for x in runs[f"stream {k}"]]) / med["cp+sync"]}
                   for k in adapters},
        "startup_s": floor["wall_s"],
        "notes": "cp: `cp --reflink=never` of the shards (returns with the data possibly still in the page cache); "
                 "cp+sync: the same followed by `sync FILES` (fsync), as the merge fsyncs every shard before its "
                 "rename. Inputs are in the page cache for every run. floor: a process that imports what `peftcli "
                 "merge` imports and touches no weights. The streaming merges run with --no-verify (the verified run "
                 "loads the model twice to compare logits: see its row). Merge wall times include the start-up "
                 "(Python, torch and transformers imports), which cp does not pay.",
        "minutes": round((time.time() - t0) / 60, 2),
    }
    res["targets"] = {}
    for k in adapters:
        budget = largest + adapter_bytes[k] / 2**20
        res["targets"][f"{k}: peak RSS above the floor <= largest shard + adapter"] = {
            "value": peak[k] - fl, "target": f"<= {budget:.0f} MB", "met": peak[k] - fl <= budget}
        res["targets"][f"{k}: wall time / (cp + fsync) <= 1.5"] = {
            "value": res["ratios"][k]["wall_over_cp_sync"], "target": "<= 1.5", "met": res["ratios"][k]["wall_over_cp_sync"] <= 1.5}
    if identity is not None:  # not run for the large model (the in-memory merge holds it twice)
        res["targets"]["bit-identical to the in-memory merge (all-linear)"] = {
            "value": identity["bit_identical"], "target": "true", "met": identity["bit_identical"]}
    out.mkdir(parents=True, exist_ok=True)
    name = "merge_stream" + ("" if size == "full" else f"_{size}")
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / f"{name.upper()}.md").write_text(report(res))
    print(report(res))
    return 0


def report(r: dict) -> str:
    m, z = r["model"], r["model"]["shape"]
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    L = ["# Streaming merge benchmark", "",
         f"- Date: {r['date']}; machine: {r['machine'].get('cpu')}, {r['machine'].get('usable_cores')} cores, "
         f"{r['machine'].get('ram_gb')} GB RAM, load average at start {r['machine'].get('loadavg')} (shared); peftcli "
         f"{r['versions'].get('peftcli')} ({r['versions'].get('peftcli_commit')}), torch {r['versions'].get('torch')}, "
         f"transformers {r['versions'].get('transformers')}",
         f"- Invocation: `{r['invocation']}` ({r['minutes']} min)",
         f"- Base: Llama-shaped, random {m['dtype']} weights, hidden {z['hidden']}, intermediate {z['intermediate']}, "
         f"{z['layers']} layers, vocab {z['vocab']}: {m['bytes'] / 1e9:.2f} GB in {m['shards']} shards of "
         f"{mb(min(m['shard_bytes']))}-{mb(m['largest_shard_bytes'])}",
         "- Adapters: " + "; ".join(f"{k}: LoRA {v['lora']}, {mb(v['bytes'])}" for k, v in r["adapters"].items()),
         f"- Median of {r['repeats']} runs per row, rows alternating; every run a fresh process, peak RSS from wait4.", "",
         "| command | wall s (median) | peak RSS |", "|---|---|---|"]
    for side, runs in r["runs"].items():
        label = {"cp": "cp --reflink=never (the shards)", "cp+sync": "cp, then sync FILES (fsync)"}.get(
            side, f"peftcli merge --no-verify, LoRA {side.removeprefix('stream ')} (streaming)")
        L.append(f"| {label} | {r['median_wall_s'][side]:.2f} | {median([x['peak_rss_mb'] for x in runs]):.0f} MB |")
    if v := r["stream_verified_all_linear"]:
        L.append(f"| peftcli merge, LoRA all-linear (streaming, verified: loads the model twice) | {v['wall_s']:.2f} | {v['peak_rss_mb']:.0f} MB |")
    if r.get("in_memory_all_linear"):
        x = r["in_memory_all_linear"]
        L.append(f"| peftcli merge --in-memory --no-verify, LoRA all-linear | {x['wall_s']:.2f} | {x['peak_rss_mb']:.0f} MB |")
    L.append(f"| floor: python importing what the merge imports (start-up) | {r['startup_s']:.2f} | {r['floor_rss_mb']:.0f} MB |")
    L += ["", f"| adapter | peak RSS / largest shard | (peak RSS - floor) / largest shard | wall / (cp + fsync) | wall / cp | "
              f"(wall - {r['startup_s']:.1f} s start-up) / (cp + fsync) | shard-writing phase / (cp + fsync) |",
          "|---|---|---|---|---|---|---|"]
    for k, x in r["ratios"].items():
        L.append(f"| {k} | {x['peak_rss_over_largest_shard']:.2f} | {x['peak_rss_above_floor_over_largest_shard']:.2f} | "
                 f"{x['wall_over_cp_sync']:.2f} | {x['wall_over_cp']:.2f} | {x['wall_less_startup_over_cp_sync']:.2f} | "
                 f"{x['write_phase_over_cp_sync']:.2f} |")
    L += ["", "| target | value | want | met |", "|---|---|---|---|"]
    for k, t in r["targets"].items():
        val = t["value"] if isinstance(t["value"], bool) else f"{t['value']:.2f}"
        L.append(f"| {k} | {val} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    bi = r.get("bit_identity_all_linear")
    if bi:
        L += ["", f"Streamed vs in-memory output (all-linear): {bi['tensors']} tensors, "
                  f"{'every one bit-identical' if bi['bit_identical'] else 'DIFFERENT: ' + ', '.join(bi['differing'][:5])}."]
    L += ["", r["notes"], ""]
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
