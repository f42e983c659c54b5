"""The loss alone: cross-entropy of upsampled logits, straightforward against fused.

"straightforward" is F.interpolate (channels-last) then F.cross_entropy, what CrossEntropyLoss ran
before segformer/training/upsampled_ce.py; "fused" is CrossEntropyLoss today. Forward + backward
of the loss on random logits, timed alternately (median of --repeat after a warm-up; wall clock
and process CPU time, which a loaded machine inflates less); peak memory of one forward +
backward in a fresh process each (peak resident set during it minus the resident set before).

    python benchmarks/loss.py                                  # b0 256x256 batch 2, 150 classes
    python benchmarks/loss.py --size 512 --classes 19 --width 1024 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from segformer.benchmark import peak_rss_mib, reset_peak_rss_mib
from segformer.training.losses import CrossEntropyLoss, upsampled_scores


def straightforward(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    scores = upsampled_scores(logits, labels.shape[-2:])
    return F.cross_entropy(scores, labels.reshape(-1), ignore_index=255, reduction="sum") / labels.numel()


LOSSES = {"straightforward": straightforward, "fused": CrossEntropyLoss()}


def inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    width = args.width or args.size
    logits = torch.randn(args.batch, args.classes, args.size // 4, width // 4, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch, args.size, width))
    labels[:, :8] = 255
    return logits, labels


def step(loss, logits, labels) -> None:
    loss(logits, labels).backward()
    logits.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="label height (logits are a quarter)")
    parser.add_argument("--width", type=int, default=None, help="label width (default: --size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--_memory-child", dest="child")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logits, labels = inputs(args)
    if args.child:
        base = reset_peak_rss_mib()
        step(LOSSES[args.child], logits, labels)
        print(json.dumps({"peak_mib": peak_rss_mib() - base}))
        return

    a, b = (LOSSES[name](logits, labels) for name in LOSSES)
    ga, gb = (torch.autograd.grad(LOSSES[name](logits, labels), logits)[0] for name in LOSSES)
    print(f"loss difference {abs(a.item() - b.item()):.1e}, max gradient difference {(ga - gb).abs().max().item():.1e}")
    wall: dict[str, list[float]] = {name: [] for name in LOSSES}
    cpu: dict[str, list[float]] = {name: [] for name in LOSSES}
    for name, loss in LOSSES.items():
        step(loss, logits, labels)
        step(loss, logits, labels)
    for _ in range(args.repeat):
        for name, loss in LOSSES.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step(loss, logits, labels)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    peaks = {}
    for name in LOSSES:
        command = [sys.executable, __file__, "--_memory-child", name] + sys.argv[1:]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    width = args.width or args.size
    print(f"logits {args.batch}x{args.classes}x{args.size // 4}x{width // 4} -> labels {args.size}x{width}, {args.threads} threads")
    print("| loss | wall ms (median) | CPU ms (median) | peak MiB |")
    print("|---|---|---|---|")
    for name in LOSSES:
        print(f"| {name} | {statistics.median(wall[name]) * 1000:.0f} | {statistics.median(cpu[name]) * 1000:.0f} | {peaks[name]:.0f} |")


if __name__ == "__main__":
    main()
