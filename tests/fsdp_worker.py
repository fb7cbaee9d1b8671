"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: LoRA on a tiny Llama sharded with
FSDP2 (torch's fully_shard, per decoder layer + root, over gloo), two training steps, then peftcli's save
path (adapter_io.adapter_tensors on every process, write_adapter on the main one). Rank 0 also trains an
unsharded copy on the whole batch and writes it as the reference."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from peftcli import adapter_io, checkpoint
from peftcli.methods import build_method

META = {"base": {"name_or_path": "tiny-llama", "task": "causal-lm"}}


def train(model, ids: torch.Tensor, steps: int = 2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def resume_state_roundtrip(model, opt, ref_model, ref_opt) -> dict:
    """peftcli.checkpoint's optimizer/parameter save and load under FSDP2: gathered whole (equal to the
    unsharded run's), then loaded back into the shards (equal to what was saved)."""
    names = {id(p): n for n, p in ref_model.named_parameters()}
    ref = {names[id(p)]: s["exp_avg"] for p, s in ref_opt.state.items()}
    full = checkpoint.optimizer_state(model, opt)  # whole on rank 0, {} elsewhere: the main process writes it
    path = Path(sys.argv[1]) / "optimizer.pt"
    if dist.get_rank() == 0:
        torch.save(full, path)
    dist.barrier()
    full = torch.load(path, weights_only=False)  # as a resume does: every process reads the file
    got = {k: v["exp_avg"] for k, v in full["state"].items()}
    optim_diff = max((got[k] - ref[k]).abs().max().item() for k in ref) if ref.keys() == got.keys() else float("inf")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: adapter_io.full_tensor(p) for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.zero_()
        for s in opt.state.values():
            s["exp_avg"].zero_()
    for n, p in params.items():
        checkpoint.load_parameter(p, saved[n])
    checkpoint.load_optimizer_state(model, opt, full)
    again = checkpoint.optimizer_state(model, opt)
    return {"optim_max_diff": optim_diff,
            "optim_roundtrip": dist.get_rank() != 0 or all(torch.equal(again["state"][k]["exp_avg"], got[k]) for k in got),
            "param_roundtrip": all(torch.equal(adapter_io.full_tensor(p), saved[n]) for n, p in params.items())}


def main(tmp: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(tmp / "llama", dtype=torch.float32)
    torch.manual_seed(0)
    method = build_method({"name": "lora", "r": 4, "target_modules": "all-linear"})
    method.apply(model)
    with torch.no_grad():  # B = 0 would leave A's gradient zero: move it so both factors train
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ids = torch.randint(5, 1000, (2 * world, 12), generator=torch.Generator().manual_seed(2))

    ref = copy.deepcopy(model)  # every process: the unsharded run on the whole batch
    ref_opt = train(ref, ids)
    if rank == 0:
        adapter_io.write_adapter(tmp / "single", method, ref, META)

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = train(model, ids[2 * rank:2 * rank + 2])  # equal token counts: the averaged gradient is the whole batch's
    lora_a = next(p for n, p in model.named_parameters() if n.endswith("lora_A.weight"))
    tensors = adapter_io.adapter_tensors(method, model)  # every process: all-gathers the shards
    report = {"lora_A_local_rows": lora_a.to_local().shape[0], **resume_state_roundtrip(model, opt, ref, ref_opt)}
    if rank == 0:
        adapter_io.write_adapter(tmp / "fsdp", method, model, META, tensors=tensors)
        adapter_io.atomic_write(tmp / "fsdp" / "sharded.json", json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
