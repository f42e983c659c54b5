"""The batch a run trains with: per device, devices, nodes, accumulation, and the global batch."""

from __future__ import annotations


def batch_summary(per_device: int, devices: int, num_nodes: int, accumulate: int) -> str:
    """One line naming the per-device and the global batch size (what the learning rate sees)."""
    processes = devices * num_nodes
    global_batch = per_device * processes * accumulate
    parts = [f"{per_device} per device", f"{devices} device(s)"]
    if num_nodes > 1:
        parts.append(f"{num_nodes} nodes")
    if accumulate > 1:
        parts.append(f"{accumulate} accumulated batches")
    return f"Batch size: {' x '.join(parts)} = {global_batch} images per optimizer step"
