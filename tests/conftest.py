"""Test-session settings: under pytest-xdist (``-n``), one torch thread per worker.

Two workers on two cores each running two OpenMP threads would oversubscribe the cores, and
OpenMP threads spin while they wait; one thread each keeps every core busy with useful work.
The variable also reaches the scripts that tests start as subprocesses.
"""

import os

import torch

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
