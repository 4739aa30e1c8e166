"""Per-sample gradient norms and clipped sums for DP-SGD (book-keeping style).

Layers: ``reference`` (plain-torch oracles), per-layer fast paths (``linear``, ``conv``,
``group_norm``, ``embedding``, ``clip``), the per-layer-type rules (``layers``), reused
scratch buffers (``workspace``) and the hook engine (``bookkeeping``). The fast paths are
plain torch ops, so they run on any device (dispatch is by the tensors' device inside
torch); there is no Triton path yet.
"""

from .bookkeeping import BookKeepingClipper, LossReduction, PerSampleUsageError
from .clip import clip_factors, per_sample_sq_norms, weighted_sum
from .conv import conv_per_sample_grads, use_im2col
from .embedding import embedding_clipped_sum, embedding_sq_norms
from .group_norm import group_norm_fused_backward, group_norm_per_sample_grads
from .layers import RULES, UnsupportedLayerError, supported_layer_names
from .linear import linear_clipped_sum, linear_sq_norms
from .reference import (
    CLIP_EPS,
    reference_clip_factors,
    reference_clipped_sum,
    reference_conv_per_sample_grads,
    reference_embedding_per_sample_grads,
    reference_group_norm_per_sample_grads,
    reference_linear_per_sample_grads,
)
from .workspace import Workspace, warm_heap

__all__ = [
    "CLIP_EPS",
    "RULES",
    "BookKeepingClipper",
    "LossReduction",
    "PerSampleUsageError",
    "UnsupportedLayerError",
    "Workspace",
    "clip_factors",
    "conv_per_sample_grads",
    "embedding_clipped_sum",
    "embedding_sq_norms",
    "group_norm_fused_backward",
    "group_norm_per_sample_grads",
    "linear_clipped_sum",
    "linear_sq_norms",
    "per_sample_sq_norms",
    "reference_clip_factors",
    "reference_clipped_sum",
    "reference_conv_per_sample_grads",
    "reference_embedding_per_sample_grads",
    "reference_group_norm_per_sample_grads",
    "reference_linear_per_sample_grads",
    "supported_layer_names",
    "use_im2col",
    "warm_heap",
    "weighted_sum",
]
