"""What a SegFormer costs: ``python -m segformer.benchmark model=b2 data=ade20k`` (configs/benchmark.yaml).

Prints the parameters, the GFLOPs of one image at the dataset's evaluation size, and the latency,
FPS and peak memory of a forward pass on the current device; writes them to
``<run dir>/benchmark.json``. GFLOPs are counted as the paper (and mmcv's ``get_flops``) count
them: multiply-adds, i.e. ``torch.utils.flop_counter``'s FLOPs / 2, of the paper's step-by-step
decode head; "as run" counts the folded head this code runs (``model.fast_head``, BatchNorm
folded). Counting runs on meta tensors: no memory, no compute, any size.

The evaluation size is ``size=[h,w]`` if given, else the dataset's: the crop size for
whole-image evaluation (ADE20K: 512x512, as the paper), the full test image for sliding-window
evaluation (Cityscapes: 1024x2048, as the paper; latency is then one forward of that image).
"""

from __future__ import annotations

import copy
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from segformer import cli
from segformer.errors import ConfigError
from segformer.model import SegFormer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def count_gflops(model: SegFormer, size: tuple[int, int], fast_head: bool = False) -> float:
    """Multiply-adds (in 1e9) of one (1, 3, h, w) forward in eval mode, counted on a meta copy."""
    meta = copy.deepcopy(model).to("meta").eval()
    meta.fast_head = fast_head
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(1, 3, *size, device="meta"))
    return counter.get_total_flops() / 2e9


def evaluation_size(cfg: DictConfig) -> tuple[int, int]:
    """``size`` if set, else the crop size (whole-image evaluation) or the test image (sliding window)."""
    if cfg.size is not None:
        size = tuple(int(s) for s in cfg.size)
    elif cfg.data.inference.mode == "slide":
        long, short = cfg.data.scale
        size = (int(short), int(long))
    else:
        size = tuple(int(s) for s in cfg.data.crop_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"size={list(size)} must be [height, width] in pixels.")
    return size


def time_forward(model: SegFormer, pixels: torch.Tensor, warmup: int, repeat: int) -> tuple[float, float]:
    """Median seconds of a forward, and its peak memory in MiB (CUDA: allocated; CPU: resident set).

    On CPU the peak counts from before the first forward: afterwards the allocator keeps the freed
    pages resident, and later forwards add nothing to the resident set.
    """
    cuda = pixels.device.type == "cuda"
    base = 0.0 if cuda else reset_peak_rss_mib()
    with torch.inference_mode():
        for _ in range(warmup):
            model(pixels)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            model(pixels)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else peak_rss_mib() - base
    return statistics.median(times), peak


def reset_peak_rss_mib() -> float:
    """Restart Linux's peak resident set count (model building peaked higher); the resident set now."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_mib("VmRSS")
    except OSError:  # not Linux: the peak since the process started
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    try:
        return _status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(key + ":")).split()[1]) / 1024


def device_name(device: torch.device) -> str:
    """The device as timings must name it: a CPU's model, family and vector ISA change them severalfold."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    family = f", family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields and "model" in fields else ""
    return f"{model} CPU{family}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Build the configured model and measure it; prints a table and writes benchmark.json."""
    if cfg.repeat < 1 or cfg.warmup < 0 or cfg.batch_size < 1:
        raise ConfigError(f"repeat (>= 1), warmup (>= 0) and batch_size (>= 1) got {cfg.repeat}, {cfg.warmup}, {cfg.batch_size}.")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    size = evaluation_size(cfg)
    model = hydra.utils.instantiate(cfg.model).eval()
    result: dict[str, Any] = {
        "model": model.variant,
        "size": list(size),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops_paper": count_gflops(model, size, fast_head=False),
        "gflops_as_run": count_gflops(model, size, fast_head=True),
    }
    model = model.to(device)
    pixels = torch.randn(cfg.batch_size, 3, *size, device=device)
    seconds, peak = time_forward(model, pixels, cfg.warmup, cfg.repeat)
    result.update(
        device=device_name(device),
        batch_size=cfg.batch_size,
        latency_ms=seconds * 1000,
        fps=cfg.batch_size / seconds,
        peak_memory_mib=peak,
    )
    print(
        f"SegFormer-{result['model'].upper()} at {size[0]}x{size[1]} on {result['device']}, batch {cfg.batch_size}:\n"
        f"  parameters        {result['parameters_m']:.2f} M\n"
        f"  GFLOPs (paper)    {result['gflops_paper']:.1f}   multiply-adds, the paper's step-by-step head\n"
        f"  GFLOPs (as run)   {result['gflops_as_run']:.1f}   the folded head this code runs\n"
        f"  latency           {result['latency_ms']:.1f} ms (median of {cfg.repeat}, after {cfg.warmup} warm-up)\n"
        f"  throughput        {result['fps']:.2f} images/s\n"
        f"  peak memory       {peak:.0f} MiB ({'allocated' if device.type == 'cuda' else 'resident set'}, forward)"
    )
    output = Path(cfg.paths.output_dir) / "benchmark.json"
    output.write_text(json.dumps(result, indent=2))
    print(f"Written: {output}")
    return result


if __name__ == "__main__":
    cli.run(benchmark, CONFIG_DIR, "benchmark")
