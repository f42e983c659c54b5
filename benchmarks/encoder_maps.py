"""What contiguous encoder maps cost: SegFormer-B0 forward at 512x512 on the CPU with the maps
as MiT makes them (channels-last, what the decode head consumes) and copied to contiguous NCHW
(what ``model.encoder(x)`` and ``output_hidden_states`` return).

    python benchmarks/encoder_maps.py [--threads 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from segformer import SegFormer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=150).eval()
    x = torch.randn(1, 3, 512, 512)
    times: dict[str, list[float]] = {
        "forward (channels-last maps)": [],
        "forward (contiguous maps)": [],
        "the four copies": [],
    }
    with torch.no_grad():
        for i in range(args.repeats + 2):
            start = time.perf_counter()
            model.decode_head(model.features(x))
            middle = time.perf_counter()
            maps = model.features(x)
            copied = time.perf_counter()
            maps = [m.contiguous() for m in maps]
            copy_end = time.perf_counter()
            model.decode_head(maps)
            end = time.perf_counter()
            if i >= 2:  # warm-up
                times["forward (channels-last maps)"].append(middle - start)
                times["forward (contiguous maps)"].append(end - middle)
                times["the four copies"].append(copy_end - copied)
    for name, values in times.items():
        print(f"{name}: median {1000 * statistics.median(values):.1f} ms over {len(values)} runs")


if __name__ == "__main__":
    main()
