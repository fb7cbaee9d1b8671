"""The training benchmark's one device (issue 13, GPU section), checked on a CPU machine: --device parsing and
its record in the results, the environment that keeps peftcli on the bench's device, the peer loop moving every
batch to its device and reading clocks after the device finished, the memory measure (GPU memory on cuda, never
RSS in its place), tf32 rows on cuda only and the MFU denominator of the run's precision. CUDA itself is faked
where a path needs it: what is pinned is which calls are made and which figures are read."""

from __future__ import annotations

import json

import pytest
import torch

from bench import peak as peak_mod
from bench import peer_hf
from bench import run as bench_run
from bench.common import BenchError, device_facts, train_hparams
from tests.conftest import make

H100 = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "count": 1, "cuda": "12.8", "capability": "9.0", "choice": "cuda"}
CPU = {"type": "cpu", "name": "x86_64", "choice": "cpu"}


def _ctx(tmp_path, device: dict, *argv: str) -> bench_run.Ctx:
    a = bench_run.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *argv])
    return bench_run.Ctx(a, device)


# ---------------------------------------------------------------- the choice and its record

def test_device_option_parses_and_defaults_to_auto():
    assert bench_run.parse_args([]).device == "auto"
    assert bench_run.parse_args(["--device", "cuda"]).device == "cuda"
    assert bench_run.parse_args(["--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--device", "tpu"])
    assert "tf32" in bench_run.parse_args([]).precisions.split(",")
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--precisions", "fp32,fp8"])


def test_device_facts_resolve_in_a_child_process():
    assert device_facts("cpu")["type"] == "cpu"
    auto = device_facts("auto")
    assert auto["type"] == ("cuda" if torch.cuda.is_available() else "cpu") and auto["choice"] == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(BenchError):
            device_facts("cuda")


def test_meta_and_report_name_the_gpu(tmp_path):
    c = _ctx(tmp_path, H100, "--device", "cuda")
    meta = bench_run.make_meta(c, ["--device", "cuda"])
    assert meta["device"]["name"] == "NVIDIA H100 80GB HBM3"
    meta.update(commands={}, sizes_note="")
    (tmp_path / "out").mkdir()
    bench_run.write_report(tmp_path / "out", meta)
    text = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "Training device (both sides, `--device cuda`): NVIDIA H100 80GB HBM3" in text


def test_every_measured_process_gets_the_device_through_accelerate_use_cpu(tmp_path):
    assert _ctx(tmp_path, CPU).env["ACCELERATE_USE_CPU"] == "1"  # peftcli stays on the CPU even where CUDA exists
    assert _ctx(tmp_path, H100).env["ACCELERATE_USE_CPU"] == "0"


def test_tf32_rows_on_cuda_only(tmp_path):
    cuda = bench_run.train_plan(_ctx(tmp_path, H100, "--workloads", "alpaca,gsm8k", "--bf16-workloads", "alpaca"))
    assert {"peftcli-tf32", "peft-tf32"} <= set(cuda["alpaca"]) and "peft-tf32" not in cuda["gsm8k"]
    assert cuda["alpaca"]["peft-tf32"] == ("peft", ["train.tf32=true"])
    cpu = bench_run.train_plan(_ctx(tmp_path, CPU, "--workloads", "alpaca"))
    assert not any("tf32" in side for side in cpu["alpaca"])


# ---------------------------------------------------------------- memory and utilisation

def test_memory_measure_is_gpu_memory_on_cuda_and_rss_on_cpu():
    run = {"peak_rss_mb": 2500.0, "peak_gpu_mb": 800.0}
    assert bench_run.peak_memory(run, "cuda") == 800.0
    assert bench_run.peak_memory(run, "cpu") == 2500.0
    assert bench_run.peak_memory({"peak_rss_mb": 2500.0}, "cuda") is None  # never RSS in place of GPU memory
    assert bench_run.gpu_peak_mb([{"step": 1, "max_memory_allocated_mb": 700.0}, {"step": 2, "max_memory_allocated_mb": 800.0},
                                  {"step": 2, "eval_loss": 1.0}]) == 800.0
    assert bench_run.gpu_peak_mb([{"step": 1, "loss": 2.0}]) is None


def test_run_device_reads_both_sides_records():
    assert bench_run.run_device("peftcli", {"distributed": {"processes": [{"device": "cuda:0"}]}}) == "cuda:0"
    assert bench_run.run_device("peft", {"device": "cpu"}) == "cpu"


def _run(tokens_per_s: float, rss: float, gpu: float | None, **extra) -> dict:
    return {"rc": 0, "s_per_step": 1.0, "nonpad_tokens_per_s": tokens_per_s, "nonpad_tokens_per_cpu_s": tokens_per_s,
            "peak_rss_mb": rss, "peak_gpu_mb": gpu, "wall_s": 10.0, "measured_steps": [2], "measured_s": 1.0,
            "step_tokens": [100, 100], "losses": [2.0, 1.9], **extra}


def test_workload_ratios_and_targets_read_gpu_memory_and_the_precision_peak(tmp_path):
    c = _ctx(tmp_path, H100, "--device", "cuda")
    stats = [{"step": s, "tokens": 100, "label_tokens": 50, "attn_pairs": 1000} for s in (1, 2)]
    dims = {"linear_params": 1000, "adapter_params": 10, "head_params": 100, "layers": 2, "attn_width": 64}
    runs = {"peftcli": [_run(200.0, 3000.0, 300.0)], "peft": [_run(100.0, 2000.0, 1000.0, step_stats=stats, dims=dims)],
            "peftcli-tf32": [_run(400.0, 3000.0, 300.0)], "peft-tf32": [_run(200.0, 2000.0, 1000.0)]}
    peak = {"fp32_gflops": 50_000.0, "tf32_gflops": 400_000.0, "bf16_gflops": 800_000.0}
    targets: dict = {}
    out = bench_run.train_workload(c, "alpaca", runs, peak, targets)
    q = out["ratios"]["peftcli/peft"]
    assert q["peak_mem"] == pytest.approx(0.3) and q["peak_rss"] == pytest.approx(1.5)
    assert targets["alpaca: peak GPU memory vs peft (fp32)"]["value"] == pytest.approx(0.3)
    assert not any("RSS" in k for k in targets)
    s = out["summary"]
    assert s["peftcli-tf32"]["mfu_of"] == "tf32"
    assert s["peftcli-tf32"]["mfu"] == pytest.approx(s["peftcli-tf32"]["model_gflops_per_s"] / 400_000.0)
    assert s["peftcli"]["mfu"] == pytest.approx(s["peftcli"]["model_gflops_per_s"] / 50_000.0)
    assert out["ratios"]["peftcli-tf32/peft-tf32"]["tokens_per_s"] == pytest.approx(2.0)
    # the report says which memory it compares
    rep = "\n".join(bench_run.train_report({"sizes": {"batch": 4, "seq": 256, "steps": 4, "warmup_steps_skipped": 1,
                                                      "repeats": 1}, "device": H100, "peak": peak, "peaks": [],
                                            "workloads": {"alpaca": out}}))
    assert "NVIDIA H100 80GB HBM3" in rep and "peak GPU MB | GPU mem vs HF PEFT | peak RSS (MB)" in rep
    assert "| peftcli fp32 | 200.0 | 2.00 |" in rep and "| 300 | 0.30 | 3,000 |" in rep


def test_a_run_on_the_wrong_device_is_left_out(tmp_path):
    c = _ctx(tmp_path, H100, "--device", "cuda")
    runs = {"peftcli": [_run(200.0, 3000.0, None, device="cpu", device_mismatch="ran on cpu")],
            "peft": [_run(100.0, 2000.0, 1000.0)]}
    out = bench_run.train_workload(c, "alpaca", runs, {}, {})
    assert out["summary"]["peftcli"]["ok_runs"] == 0 and out["summary"]["peftcli"]["nonpad_tokens_per_s"] is None
    assert out["ratios"]["peftcli/peft"]["tokens_per_wall_s"] is None


def test_peak_on_cpu_has_no_tf32_row_and_restores_the_precision():
    res = peak_mod.peak(64, 1, "cpu")
    assert res["device"] == "cpu" and res["fp32_gflops"] > 0 and res["bf16_gflops"] > 0 and "tf32_gflops" not in res
    assert torch.get_float32_matmul_precision() == "highest"


def test_peak_on_cuda_times_fp32_tf32_bf16_between_synchronizations(monkeypatch):
    """No GPU here: the tensors stay on the CPU (Tensor.to ignores the cuda device), the synchronizations and the
    matmul precision of each timed product are recorded."""
    log = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, dev, dtype=None, **kw: real_to(self, dtype))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, out=None: log.append((a.dtype, torch.get_float32_matmul_precision()))
                        or real_mm(a, b, out=out))
    res = peak_mod.peak(32, 2, "cuda")
    assert res["device"] == "cuda" and res["device_name"] == "fake GPU"
    assert {"fp32_gflops", "tf32_gflops", "bf16_gflops"} <= set(res) and not any(k.endswith("_cpu") for k in res)
    timed = [x for x in log if x != "sync"]
    assert (torch.float32, "highest") in timed and (torch.float32, "high") in timed and (torch.bfloat16, "highest") in timed
    assert log.count("sync") >= 2 * 2 * 3  # before and after each of 2 timed products, 3 precisions
    assert torch.get_float32_matmul_precision() == "highest"


# ---------------------------------------------------------------- the peer's loop

ROWS = [{"input_ids": ids, "labels": ids} for ids in ([5, 9, 11, 7, 5, 9, 13], [8, 6, 4, 2, 8], [3, 3, 5, 5, 7, 7, 9, 9],
                                                      [4, 6, 8, 10, 12])]


def _loop(tmp_path, **kw):
    model = make("llama")
    hp = train_hparams({"train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0}})
    dl = peer_hf.loader(ROWS, 2, 0, peer_hf.collate(0, None))
    peer_hf.train_loop(model, dl, hp, tmp_path / "metrics.jsonl", **kw)
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_peer_loop_moves_every_batch_to_the_models_device(tmp_path, monkeypatch):
    moved = []
    real = peer_hf.to_device

    def record(batch, device):
        out = real(batch, device)
        moved.append((device, {v.device for v in out.values()}))
        return out

    monkeypatch.setattr(peer_hf, "to_device", record)
    lines = _loop(tmp_path, autocast=True)
    assert moved == [(torch.device("cpu"), {torch.device("cpu")})] * 2  # one per micro-batch, to the model's device
    assert len(lines) == 2 and "max_memory_allocated_mb" not in lines[0]


def test_peer_loop_on_cuda_autocasts_there_synchronizes_and_logs_gpu_memory(tmp_path, monkeypatch):
    """The cuda branch with CUDA faked: batches 'moved' to cuda (kept on the CPU), autocast asked for the cuda
    device type, a synchronize before each step's clock, torch.cuda.max_memory_allocated in every line."""
    import contextlib

    calls = []
    monkeypatch.setattr(peer_hf, "to_device", lambda batch, device: calls.append(("to", device.type)) or batch)
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype=None: calls.append(("autocast", device_type, dtype))
                        or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync",)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**20)
    lines = _loop(tmp_path, autocast=True, device=torch.device("cuda"))
    assert [x for x in calls if x[0] == "to"] == [("to", "cuda")] * 2
    assert [x for x in calls if x[0] == "autocast"] == [("autocast", "cuda", torch.bfloat16)] * 2
    assert calls.count(("sync",)) == 3  # before the start clock and after each of the 2 steps
    assert calls[-1] == ("sync",)  # the last thing before the final clock read
    assert [x["max_memory_allocated_mb"] for x in lines] == [5.0, 5.0]
    assert sum(x["tokens"] for x in lines) == sum(len(r["input_ids"]) for r in ROWS)  # one epoch, counted on the host
