"""Where SegFormer's CPU inference time goes: torch.profiler tables by op and by module.

    python benchmarks/profile_inference.py                         # b0 512x512 batch 1
    python benchmarks/profile_inference.py --variant b2
    python benchmarks/profile_inference.py --slide                 # b0, one 1024x2048 image, crop 1024, stride 768

By module: each module's inclusive time (its children included), summed over the model's modules
of one kind (e.g. every ``attn.sr`` of stage 1); the attention kernel and the slide engine's own
steps (window logits' upsampling, accumulation) are named ranges. Random weights, eval mode.
"""

from __future__ import annotations

import argparse
import re

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from segformer import SegFormer
from segformer.inference import slide_logits


def _kind(name: str) -> str:
    """``encoder.stages.0.blocks.1.attn.q`` -> ``stage1 attn.q`` (blocks of a stage summed)."""
    name = re.sub(r"^encoder\.stages\.(\d)\.", lambda m: f"stage{int(m.group(1)) + 1} ", name)
    return re.sub(r"blocks\.\d+\.", "", name)


def attach_ranges(model: nn.Module) -> None:
    """A profiler range around every module's forward, named by its kind."""
    for name, module in model.named_modules():
        if not name:
            continue
        label = _kind(name)

        def pre(module, args, label=label):
            module._range = record_function(label)
            module._range.__enter__()

        def post(module, args, output):
            module._range.__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def table(prof, top: int, modules: bool) -> str:
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) / 1000
    rows = []
    for e in averages:
        is_range = not e.key.startswith("aten::") and not e.key.startswith("ProfilerStep")
        if modules != is_range:
            continue
        ms = (e.cpu_time_total if modules else e.self_cpu_time_total) / 1000
        rows.append((ms, e.key, e.count))
    rows.sort(reverse=True)
    kind = "module / range (inclusive)" if modules else "op (self)"
    lines = [f"| {kind} | ms per run | % of run | calls per run |", "|---|---|---|---|"]
    for ms, key, count in rows[:top]:
        lines.append(f"| {key} | {ms / RUNS:.1f} | {100 * ms / total:.1f} | {count // RUNS} |")
    lines.append(f"| total (self times of all ops) | {total / RUNS:.1f} | 100 | |")
    return "\n".join(lines)


RUNS = 3


def main() -> None:
    global RUNS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slide", action="store_true", help="sliding window over one 1024x2048 image (19 classes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    RUNS = args.runs
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

    with torch.inference_mode():
        run()  # warm-up
        attach_ranges(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(RUNS):
                run()
    print(table(prof, args.top, modules=False))
    print()
    print(table(prof, args.top, modules=True))


if __name__ == "__main__":
    main()
