"""Where SegFormer's CPU inference time goes: a table by op (torch.profiler) and one by module.

    python benchmarks/profile_inference.py                         # b0 512x512 batch 1, 150 classes
    python benchmarks/profile_inference.py --variant b2
    python benchmarks/profile_inference.py --slide                 # b0, one 1024x2048 image, 19 classes

By op: the profiler's self times (wall clock). By module: each module's inclusive CPU time
(forward hooks reading ``time.thread_time`` with one thread, ``time.process_time`` with more: run
those with OMP_WAIT_POLICY=PASSIVE), summed over the blocks of a stage; with ``--slide`` the time
outside the model (the window grid, upsampling the windows' logits into the accumulator, the
average) is its own row. CPU times leave out the time other jobs hold the cores, so the module
table holds on a shared machine. Random weights, eval mode, ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from segformer import SegFormer
from segformer.inference import slide_logits


def _kind(name: str) -> str:
    """``encoder.stages.0.blocks.1.attn.q`` -> ``stage1 attn.q`` (the blocks of a stage summed)."""
    name = re.sub(r"^encoder\.stages\.(\d)(\.|$)", lambda m: f"stage{int(m.group(1)) + 1}{' ' if m.group(2) else ''}", name)
    return re.sub(r"blocks\.\d+(\.|$)", lambda m: "" if m.group(1) else "blocks", name)


def op_table(prof, runs: int, top: int) -> str:
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in events) / 1000 / runs
    lines = ["| op | self ms per run (wall) | % | calls per run |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        ms = e.self_cpu_time_total / 1000 / runs
        lines.append(f"| {e.key} | {ms:.1f} | {100 * ms / total:.1f} | {e.count // runs} |")
    lines.append(f"| all ops | {total:.1f} | 100 | |")
    return "\n".join(lines)


def module_table(model: nn.Module, run, runs: int, clock, slide: bool) -> str:
    spent: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    handles = []
    for name, module in model.named_modules():
        label = _kind(name) if name else "model"

        def pre(module, args, kwargs):
            started[id(module)] = clock()

        def post(module, args, kwargs, output, label=label):
            spent[label] += clock() - started.pop(id(module))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    start = clock()
    for _ in range(runs):
        run()
    total = (clock() - start) / runs
    for handle in handles:
        handle.remove()
    rows = {label: seconds / runs for label, seconds in spent.items()}
    if slide:
        rows["slide engine (outside the model)"] = total - rows["model"]
    lines = ["| module (inclusive) | CPU ms per run | % |", "|---|---|---|"]
    for label, seconds in sorted(rows.items(), key=lambda kv: -kv[1]):
        if label.count(".") <= 1 and seconds >= 0.005 * total:  # stages, blocks' parts, head, engine
            lines.append(f"| {label} | {1000 * seconds:.1f} | {100 * seconds / total:.1f} |")
    lines.append(f"| total | {1000 * total:.1f} | 100 |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slide", action="store_true", help="sliding window over one 1024x2048 image (19 classes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SegFormer(args.variant, num_classes=19 if args.slide else 150).eval()
    if args.slide:
        x = torch.randn(1, 3, 1024, 2048)

        def run():
            return slide_logits(model, x, (1024, 1024), (768, 768), window_batch=2)
    else:
        x = torch.randn(1, 3, args.size, args.size)

        def run():
            return model(x)

    clock = time.thread_time if args.threads == 1 else time.process_time
    with torch.inference_mode():
        run()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.runs):
                run()
        print(op_table(prof, args.runs, args.top))
        print()
        print(module_table(model, run, args.runs, clock, args.slide))


if __name__ == "__main__":
    main()
