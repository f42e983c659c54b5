"""SegFormer speed and memory against transformers' SegformerForSemanticSegmentation.

Both models carry the same random weights (ours loaded from the transformers folder, so logits
agree to 1e-4, checked before timing). Times are the median of N runs after a warm-up, the two
models timed alternately in one process so both see the same machine state; peak memory is
measured for each model in a fresh subprocess (CPU: peak resident set; CUDA: peak allocated).

    python benchmarks/speed.py                      # the headline table (CPU, 2 threads)
    python benchmarks/speed.py --only infer --variant b5 --size 640 --reference-head
    python benchmarks/speed.py --only slide --repeat 3
    python benchmarks/speed.py --device cuda --dtype bf16 --compile
    python benchmarks/speed.py --only train --variant b2 --size 512 --activation-checkpointing
    python benchmarks/speed.py --only infer --threads 1 --clock cpu   # on a machine shared with other jobs

``--clock cpu`` times the CPU time of the calling thread (``time.thread_time``): with one thread it
leaves out the time other processes hold the core, which wall-clock times of a shared machine
include (and with two threads every parallel region also waits for a descheduled one).
``--clock process`` times the CPU time of all threads, for ``--threads 2`` with
``OMP_WAIT_POLICY=PASSIVE`` (waiting OpenMP threads sleep instead of spinning): the work both
threads did, whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from segformer import SegFormer
from segformer.benchmark import device_name, peak_rss_mib, reset_peak_rss_mib
from segformer.model.mit import MIT_VARIANTS
from segformer.model.segformer import DECODER_DIMS
from segformer.training.losses import CrossEntropyLoss


def transformers_model(variant: str, num_labels: int, directory: Path):
    """A random transformers SegFormer saved to ``directory`` (BatchNorm statistics randomised)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    mit = MIT_VARIANTS[variant]
    config = SegformerConfig(
        depths=list(mit.depths),
        hidden_sizes=list(mit.hidden_sizes),
        decoder_hidden_size=DECODER_DIMS[variant],
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(config)
    bn = model.decode_head.batch_norm
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(directory)
    return model


def load_pair(variant: str, num_labels: int, directory: Path, device: str, fast_head: bool = True):
    theirs = transformers_model(variant, num_labels, directory).to(device)
    ours = SegFormer.from_pretrained(directory, fast_head=fast_head).to(device)
    return theirs, ours


def logits_of(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def transformers_loss(model, x, labels):
    """transformers' own loss (labels=): upsampled logits, cross-entropy averaged over labelled pixels."""
    return model(pixel_values=x, labels=labels).loss


OUR_LOSS = CrossEntropyLoss()  # configs/loss/cross_entropy.yaml (the fused loss)


def segformer_loss(model, x, labels):
    return OUR_LOSS(model(x), labels)


def step_fn(model, x, labels, train: bool, autocast: torch.dtype | None, device: str, loss_fn=segformer_loss):
    def run():
        with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
            if not train:
                with torch.inference_mode():
                    return logits_of(model, x)
            # Each side with its own loss (the labels have no ignored pixel: both averages agree).
            loss = loss_fn(model, x, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    return run


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time, "process": time.process_time}


def time_alternately(
    fns: dict, repeat: int, device: str, clock: str = "wall", first_calls: dict | None = None
) -> dict[str, float]:
    """Median time per call; ``first_calls`` gets each one's first call in wall-clock seconds
    (compilation included: its compiler processes are not the calling thread's CPU time)."""
    now = CLOCKS[clock]
    for name, fn in fns.items():  # warm-up (and compilation)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if first_calls is not None:
            first_calls[name] = time.perf_counter() - start
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            start = now()
            fn()
            sync(device)
            times[name].append(now() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compare(args, variant: str, size: int, batch: int, train: bool) -> dict:
    device = args.device
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours = load_pair(variant, args.num_classes, Path(tmp), device)
    width = args.width or size
    x = torch.randn(batch, 3, size, width, device=device)
    labels = torch.randint(0, args.num_classes, (batch, size, width), device=device)
    for model in (theirs, ours):
        model.train(train)
    if not train:
        with torch.inference_mode():
            error = (logits_of(theirs, x).float() - logits_of(ours, x).float()).abs().max().item()
    else:
        error = float("nan")
    fns = {"transformers": step_fn(theirs, x, labels, train, autocast, device, transformers_loss)}
    fns["segformer"] = step_fn(ours, x, labels, train, autocast, device)
    if args.compile:  # beside eager: what compile=true gains (the loss stays eager, as in training)
        fns["segformer (compiled)"] = step_fn(torch.compile(ours), x, labels, train, autocast, device)
    if args.activation_checkpointing and train:
        checkpointed = copy.deepcopy(ours)
        checkpointed.activation_checkpointing = True
        fns["segformer (activation checkpointing)"] = step_fn(checkpointed, x, labels, train, autocast, device)
    if args.reference_head and not args.compile:
        ours_ref_head = copy.deepcopy(ours)
        ours_ref_head.fast_head = False
        fns["segformer (reference head)"] = step_fn(ours_ref_head, x, labels, train, autocast, device)
    first_calls: dict[str, float] = {}
    times = time_alternately(fns, args.repeat, device, args.clock, first_calls)
    return {
        "task": f"{'train step' if train else 'inference'} {variant} {size}x{width} batch {batch}, {args.num_classes} classes",
        "times": times,
        "first_call_s": first_calls,
        "speedup": times["transformers"] / times["segformer"],
        "max_abs_logit_diff": error,
    }


def slide(args, variant: str) -> dict:
    """Sliding-window evaluation of one 1024x2048 Cityscapes-sized image (crop 1024, stride 768:
    one row of 3 windows, 2 per forward pass), through segformer.inference with each model, timed
    alternately."""
    from segformer.inference import slide_logits

    device = args.device
    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours = load_pair(variant, 19, Path(tmp), device)
    image = torch.randn(1, 3, 1024, 2048, device=device)

    def run(model):
        def go():
            with torch.inference_mode():
                return slide_logits(lambda x: logits_of(model, x), image, (1024, 1024), (768, 768), window_batch=2)

        return go

    times = time_alternately({"transformers": run(theirs.eval()), "segformer": run(ours.eval())}, args.repeat, device, args.clock)
    return {"task": f"sliding window {variant} 1024x2048 (3 windows of 1024, 2 per pass)", "times": times,
            "speedup": times["transformers"] / times["segformer"], "max_abs_logit_diff": float("nan")}


def peak_memory(args, variant: str, size: int, batch: int) -> dict[str, float]:
    """Peak memory of one training step per implementation, each in a fresh process."""
    peaks = {}
    for impl in ("transformers", "segformer"):
        out = subprocess.run(
            [sys.executable, __file__, "--_memory-child", impl, "--variant", variant, "--size", str(size),
             "--batch", str(batch), "--device", args.device, "--dtype", args.dtype,
             "--num-classes", str(args.num_classes), "--width", str(args.width or size)]
            + (["--activation-checkpointing"] if args.activation_checkpointing else []),
            capture_output=True, text=True, check=True,
        )
        peaks[impl] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    return peaks


def memory_child(args) -> None:
    device = args.device
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours = load_pair(args.variant, args.num_classes, Path(tmp), device)
    is_ours = args._memory_child == "segformer"
    model = ours if is_ours else theirs
    del theirs, ours
    model.train()
    if args.activation_checkpointing and is_ours:
        model.encoder.activation_checkpointing = True
    width = args.width or args.size
    x = torch.randn(args.batch, 3, args.size, width, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch, args.size, width), device=device)
    step = step_fn(model, x, labels, True, autocast, device, segformer_loss if is_ours else transformers_loss)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = reset_peak_rss_mib()
        step()
        peak = peak_rss_mib() - base
    print(json.dumps({"peak_mib": round(peak, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["infer", "train", "memory", "slide"], help="run one measurement")
    parser.add_argument("--variant", default=None, help="variant for --only (default: the headline set)")
    parser.add_argument("--size", type=int, default=None, help="image height (and width unless --width)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--activation-checkpointing", action="store_true", help="ours with model.activation_checkpointing: --only memory measures it instead, --only train times it beside")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile, with its first call")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="cpu: the calling thread's CPU time (use with --threads 1); process: all threads' (see above)")
    parser.add_argument("--reference-head", action="store_true", help="also time our unfolded head")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--_memory-child", dest="_memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    if args._memory_child:
        memory_child(args)
        return

    plan = []
    if args.only in (None, "infer"):
        plan += [("infer", v, args.size or 512, args.batch or 1) for v in ([args.variant] if args.variant else ["b0", "b2"])]
    if args.only in (None, "train"):
        plan += [("train", args.variant or "b0", args.size or 256, args.batch or 2)]
    if args.only in (None, "memory"):
        plan += [("memory", args.variant or "b2", args.size or 512, args.batch or 2)]
    if args.only in (None, "slide"):
        plan += [("slide", args.variant or "b0", 1024, 1)]

    print(f"device: {device_name(torch.device(args.device))}; torch {torch.__version__}; dtype {args.dtype}; compile {args.compile}; clock {args.clock}")
    print("| task | transformers | segformer | speedup | max abs logit diff |")
    print("|---|---|---|---|---|")
    results = []
    for kind, variant, size, batch in plan:
        if kind == "memory":
            peaks = peak_memory(args, variant, size, batch)
            checkpointing = ", activation checkpointing" if args.activation_checkpointing else ""
            row = f"| peak memory, train step {variant} {size}x{args.width or size} batch {batch}{checkpointing} | {peaks['transformers']:.0f} MiB | {peaks['segformer']:.0f} MiB | {peaks['segformer'] / peaks['transformers']:.2f}x of transformers' | |"
            results.append({"task": f"peak memory train {variant} {size} batch {batch}", "peak_mib": peaks})
        else:
            result = slide(args, variant) if kind == "slide" else compare(args, variant, size, batch, train=kind == "train")
            t = result["times"]
            extra = f" (reference head {t['segformer (reference head)'] * 1000:.0f} ms)" if "segformer (reference head)" in t else ""
            for label in ("compiled", "activation checkpointing"):
                if f"segformer ({label})" in t:
                    other = t[f"segformer ({label})"]
                    first = f", first call {result['first_call_s'][f'segformer ({label})']:.1f} s" if label == "compiled" else ""
                    extra += f" ({label} {other * 1000:.0f} ms, {other / t['segformer']:.2f}x eager's time{first})"
            diff = "" if result["max_abs_logit_diff"] != result["max_abs_logit_diff"] else f"{result['max_abs_logit_diff']:.1e}"
            row = f"| {result['task']} | {t['transformers'] * 1000:.0f} ms | {t['segformer'] * 1000:.0f} ms{extra} | {result['speedup']:.2f}x | {diff} |"
            results.append(result)
        print(row, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
