"""python -m segformer.benchmark: GFLOPs as the paper counts them, and the command itself."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from segformer import cli
from segformer.benchmark import CONFIG_DIR, benchmark, count_gflops
from segformer.model import SegFormer

# REFERENCE.md, Published results: ADE20K GFLOPs (b0-b4 at 512x512, b5 at its 640x640 crops).
PAPER = {"b0": (8.4, 512), "b1": (15.9, 512), "b2": (62.4, 512), "b3": (79.0, 512), "b4": (95.7, 512), "b5": (183.3, 640)}
FAST = {"b0", "b2"}


@pytest.mark.parametrize(
    "variant", [v if v in FAST else pytest.param(v, marks=pytest.mark.slow) for v in PAPER]
)
@pytest.mark.slow
def test_gflops_match_the_paper(variant):
    gflops, side = PAPER[variant]
    with torch.device("meta"):
        model = SegFormer(variant, num_classes=150)
    counted = count_gflops(model, (side, side))
    assert counted == pytest.approx(gflops, rel=0.05)
    # The folded head this code runs does less work, the encoder the same.
    assert count_gflops(model, (side, side), fast_head=True) < counted


@pytest.mark.slow
def test_the_command_prints_and_writes_the_costs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        sys, "argv",
        ["benchmark", "model=b0", "data=cityscapes", "size=[64,96]", "warmup=0", "repeat=1", f"hydra.run.dir={tmp_path}"],
    )
    cli.run(benchmark, CONFIG_DIR, "benchmark")
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["size"] == [64, 96] and result["model"] == "b0"
    assert result["parameters_m"] == pytest.approx(sum(p.numel() for p in SegFormer("b0", 19).parameters()) / 1e6)
    assert result["gflops_paper"] == pytest.approx(count_gflops(SegFormer("b0", 19), (64, 96)))
    assert result["latency_ms"] > 0 and result["fps"] > 0
    assert "GFLOPs (paper)" in out and "parameters" in out
    # A CPU timing names what sets it: the vector ISA torch dispatches to and the thread count.
    assert torch.backends.cpu.get_cpu_capability() in result["device"]
    assert f"{torch.get_num_threads()} threads" in result["device"]


@pytest.mark.slow
def test_a_bad_size_is_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmark", "size=[64]", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(benchmark, CONFIG_DIR, "benchmark")
    assert exit_info.value.code == cli.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "size=[64]" in err and "Traceback" not in err
