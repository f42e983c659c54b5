"""SegFormer semantic segmentation: Mix Transformer encoder + all-MLP decode head."""
