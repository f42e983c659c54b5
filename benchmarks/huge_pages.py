"""Transparent huge pages for torch's CPU tensors (``THP_MEM_ALLOC_ENABLE=1``), on and off.

torch reads the variable once, at its first CPU allocation, so each setting runs in its own
process; the settings alternate over ``--rounds`` pairs of processes. Prints each run's median
time and the minor page faults per call (steady state, after warm-up).

    python benchmarks/huge_pages.py [--rounds 2] [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = {  # name: (variant, batch, size, train)
    "inference b0 512x512 batch 1": ("b0", 1, 512, False),
    "inference b0 1024x1024 batch 1 (one sliding window)": ("b0", 1, 1024, False),
    "train step b0 256x256 batch 2": ("b0", 2, 256, True),
}


def child(case: str, repeat: int) -> dict:
    import torch

    from segformer import SegFormer
    from segformer.benchmark import device_name

    torch.set_num_threads(2)
    variant, batch, size, train = CASES[case]
    model = SegFormer(variant, num_classes=150).train(train)
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 150, (batch, size // 4, size // 4))

    def step() -> None:
        if train:
            torch.nn.functional.cross_entropy(model(x), labels).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(x)

    for _ in range(3):
        step()
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeat
    return {"ms": statistics.median(times) * 1000, "faults": faults, "device": device_name(torch.device("cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(args._child, args.repeat)))
        return
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
        print(f"transparent_hugepage/enabled: {handle.read().strip()} (torch madvises its large tensors: 'madvise' suffices)")
    print("| case | THP_MEM_ALLOC_ENABLE=0: ms / faults per call | =1 |")
    print("|---|---|---|")
    for case in CASES:
        runs = {"0": [], "1": []}
        for _ in range(args.rounds):
            for setting in runs:
                env = dict(os.environ, THP_MEM_ALLOC_ENABLE=setting)
                out = subprocess.run(
                    [sys.executable, __file__, "--_child", case, "--repeat", str(args.repeat)],
                    env=env, check=True, capture_output=True, text=True,
                ).stdout
                runs[setting].append(json.loads(out.splitlines()[-1]))
        cells = [", ".join(f"{r['ms']:.0f} ms / {r['faults']:.0f}" for r in runs[s]) for s in runs]
        print(f"| {case} | {cells[0]} | {cells[1]} |", flush=True)
    print(f"device: {runs['0'][0]['device']}")


if __name__ == "__main__":
    main()
