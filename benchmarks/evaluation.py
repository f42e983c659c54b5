"""The evaluation path: time and memory of ``predict_batch`` (what validation, eval.py and
predict.py run per image) against the model's forward alone, on the paper's evaluation settings.

    python benchmarks/evaluation.py                 # b0, both cases, 2 threads
    python benchmarks/evaluation.py --case ade20k --repeat 5

- ade20k: whole-image inference of one 512x683 image (ADE20K's short side 512), 150 classes,
  the label at the image's size;
- cityscapes: sliding window (crop 1024, stride 768, 2 windows per pass) over one 1024x2048
  image, 19 classes.

Random weights, eval mode. Each case runs in a fresh process; its peak memory is the peak
resident set of the first call above the resident set before it (the model loaded). To compare
two commits, run this script with ``PYTHONPATH`` pointing at an export of the other one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from segformer import SegFormer
from segformer.benchmark import device_name, peak_rss_mib, reset_peak_rss_mib
from segformer.inference import InferenceConfig, predict_batch, slide_windows

CASES = {
    "ade20k": {"classes": 150, "size": (512, 683), "inference": InferenceConfig()},
    "cityscapes": {
        "classes": 19,
        "size": (1024, 2048),
        "inference": InferenceConfig(mode="slide", crop_size=1024, stride=768, window_batch=2),
    },
}


def child(case: str, variant: str, repeat: int) -> dict:
    spec = CASES[case]
    torch.manual_seed(0)
    model = SegFormer(variant, num_classes=spec["classes"]).eval()
    height, width = spec["size"]
    batch = {
        "pixel_values": torch.randn(1, 3, height, width),
        "image_sizes": torch.tensor([[height, width]]),
        "label_sizes": torch.tensor([[height, width]]),
    }
    config = spec["inference"]

    def evaluate():
        with torch.inference_mode():
            return predict_batch(model, batch, config)

    pixels = batch["pixel_values"]
    if config.mode == "whole":
        passes = [pixels]
    else:  # the windows, stacked window_batch at a time as slide_logits stacks them
        windows = [pixels[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in slide_windows(height, width, config.crop_size, config.stride)]
        passes = [torch.cat(windows[i : i + config.window_batch]) for i in range(0, len(windows), config.window_batch)]

    def forward():  # the model's forward passes alone
        with torch.inference_mode():
            return [model(x) for x in passes]

    base = reset_peak_rss_mib()
    evaluate()
    peak = peak_rss_mib() - base
    times: dict[str, list[float]] = {"evaluate": [], "forward": []}
    for _ in range(repeat):  # alternately, so both see the same machine state
        for name, fn in (("evaluate", evaluate), ("forward", forward)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return {"case": case, **medians, "outside_model": medians["evaluate"] - medians["forward"], "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(child(args._child, args.variant, args.repeat)))
        return
    print(f"{args.variant} on {device_name(torch.device('cpu'))}, median of {args.repeat}, torch {torch.__version__}")
    print("| case | predict_batch | model forward | outside the model | peak memory (first call) |")
    print("|---|---|---|---|---|")
    for case in args.case or sorted(CASES):
        out = subprocess.run(
            [sys.executable, __file__, "--_child", case, "--variant", args.variant, "--repeat", str(args.repeat),
             "--threads", str(args.threads)],
            capture_output=True, text=True, check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        times = " | ".join(f"{r[key]:.0f} ms" for key in ("evaluate", "forward", "outside_model"))
        print(f"| {case} | {times} | {r['peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
