"""Inference: whole / sliding-window / multi-scale + flip prediction, metrics, prediction files,
pictures, the image processor, the predictor behind predict.py and ``SegFormer.predict``, and the
export writers.

One inference path (``inference.py``) serves validation, eval.py, predict.py, ``SegFormer.predict``
and export, so they never disagree.
"""

from segformer.inference.inference import (
    MODES,
    InferenceConfig,
    batch_probs,
    batch_views,
    forward_logits,
    predict_batch,
    predict_labels,
    predict_probs,
    slide_logits,
    slide_windows,
    whole_logits,
)

__all__ = [
    "MODES",
    "InferenceConfig",
    "batch_probs",
    "batch_views",
    "forward_logits",
    "predict_batch",
    "predict_labels",
    "predict_probs",
    "slide_logits",
    "slide_windows",
    "whole_logits",
]
