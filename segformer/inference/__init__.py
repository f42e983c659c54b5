"""Inference: whole / sliding-window / multi-scale + flip prediction, metrics, prediction files,
pictures, the predictor behind predict.py and the export writers.

One inference path (``inference.py``) serves validation, eval.py, predict.py and export, so they
never disagree.
"""

from segformer.inference.inference import (
    MODES,
    InferenceConfig,
    forward_logits,
    predict_batch,
    predict_batch_probs,
    predict_probs,
    slide_logits,
    slide_windows,
    whole_logits,
)

__all__ = [
    "MODES",
    "InferenceConfig",
    "forward_logits",
    "predict_batch",
    "predict_batch_probs",
    "predict_probs",
    "slide_logits",
    "slide_windows",
    "whole_logits",
]
