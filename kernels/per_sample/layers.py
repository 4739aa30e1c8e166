"""Per-layer-type rules of the book-keeping engine: what to check, keep and sum.

Each rule turns one layer call (its input ``x`` and the gradient ``g`` w.r.t. its output)
into squared per-sample norms of the layer's trainable parameters plus a small
``state`` from which :meth:`sums` later forms ``sum_i coef_i * grad_i`` per parameter.
Only parameters that require grad are counted (a frozen weight contributes nothing).
``norms`` takes the layer's :class:`~kernels.per_sample.workspace.Workspace` (``ws``) for
scratch that lives across steps; ``state`` may point into it until the step's ``sums``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .clip import per_sample_sq_norms, weighted_sum
from .conv import conv_per_sample_grads
from .embedding import embedding_clipped_sum, embedding_sq_norms
from .group_norm import (
    group_norm_fused_backward,
    group_norm_per_sample_grads,
    group_norm_relayout_pays,
)
from .linear import linear_clipped_sum, linear_sq_norms
from .workspace import Workspace


class UnsupportedLayerError(ValueError):
    """A layer with trainable parameters that the book-keeping engine cannot clip exactly."""


Sums = dict[str, torch.Tensor]


def _trainable(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.requires_grad


def _per_sample_rule_sums(state: tuple[torch.Tensor | None, ...], names, coef) -> Sums:
    """Weighted sums of materialised per-sample grads ``(weight, bias)``."""
    return {n: weighted_sum(t, coef) for n, t in zip(names, state, strict=True) if t is not None}


def _sq_of(state: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    sq = None
    for t in state:
        if t is not None:
            sq = per_sample_sq_norms(t) if sq is None else sq.add_(per_sample_sq_norms(t))
    return sq


class _Rule:
    """Defaults: any configuration is supported; the layer output is not kept."""

    #: Ask the engine to keep the (unmodified) layer output for :meth:`norms` (``y=``), and
    #: what :meth:`saved_stats` finds in its autograd node (``stats=``).
    keeps_output = False
    #: The rule can take over the layer's backward (:meth:`fused_backward`) of a contiguous
    #: input: the input gradient and the per-sample norms from one computation. Needs
    #: :meth:`saved_stats`; :meth:`relayout_pays` says when to run on a contiguous copy.
    fuses_backward = False

    @staticmethod
    def relayout_pays(x: torch.Tensor) -> bool:
        """Whether the layer should run on a contiguous copy of ``x`` (to be fused)."""
        return False

    @staticmethod
    def saved_stats(output: torch.Tensor) -> Any:
        """Tensors the layer's forward saved for its backward that :meth:`norms` can reuse."""
        return None

    @staticmethod
    def check(module: nn.Module) -> None:
        return None


class LinearRule(_Rule):
    """``nn.Linear``: exact ``||a|| ||g||`` norms (ghost norm with a sequence dim)."""

    @staticmethod
    def norms(module: nn.Linear, x: torch.Tensor, g: torch.Tensor,
              ws: Workspace | None = None) -> tuple[torch.Tensor, Any]:
        if x.dim() < 2:
            raise ValueError(f"Linear input needs a batch dimension, got shape {tuple(x.shape)}")
        w_on, b_on = _trainable(module, "weight"), _trainable(module, "bias")
        if w_on:
            sq = linear_sq_norms(x, g, bias=b_on)
        else:
            sq = per_sample_sq_norms(g.sum(dim=tuple(range(1, g.dim() - 1))) if g.dim() > 2 else g)
        return sq, (x, g)

    @staticmethod
    def sums(module: nn.Linear, state: Any, coef: torch.Tensor) -> Sums:
        x, g = state
        gw, gb = linear_clipped_sum(x, g, coef, bias=True)
        out = {"weight": gw} if _trainable(module, "weight") else {}
        if _trainable(module, "bias"):
            out["bias"] = gb
        return out


class ConvRule(_Rule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with zero padding: materialised per-sample grads."""

    @staticmethod
    def check(module: nn.Module) -> None:
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
            )

    @staticmethod
    def _explicit_padding(module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        if not isinstance(module.padding, str):
            return x, list(module.padding)
        if module.padding == "valid":
            return x, [0] * (x.dim() - 2)
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        pads = [p for t in reversed(total) for p in (t // 2, t - t // 2)]
        return torch.nn.functional.pad(x, pads), [0] * len(total)

    @staticmethod
    def norms(module, x: torch.Tensor, g: torch.Tensor,
              ws: Workspace | None = None) -> tuple[torch.Tensor, Any]:
        x, padding = ConvRule._explicit_padding(module, x)
        w_on, b_on = _trainable(module, "weight"), _trainable(module, "bias")
        gw, gb = conv_per_sample_grads(
            x, g, module.weight.shape, stride=module.stride, padding=padding,
            dilation=module.dilation, groups=module.groups, bias=b_on, workspace=ws,
        ) if w_on else (None, g.sum(dim=tuple(range(2, g.dim()))))
        state = (gw, gb)
        return _sq_of(state), state

    @staticmethod
    def sums(module, state: Any, coef: torch.Tensor) -> Sums:
        return _per_sample_rule_sums(state, ("weight", "bias"), coef)


class GroupNormRule(_Rule):
    """``nn.GroupNorm`` (affine): per-sample grads are ``(B, C)``, cheap to hold."""

    #: The saved statistics enable the folded path (contiguous input), the (unmodified)
    #: output the output path (channels-last input).
    keeps_output = True
    fuses_backward = True

    @staticmethod
    def saved_stats(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(mean, rstd)`` saved by ``native_group_norm`` for its backward, if it ran
        (detached: holding them does not keep that autograd node alive)."""
        fn = output.grad_fn
        if fn is None or fn.name() != "NativeGroupNormBackward0":
            return None
        return fn._saved_result1.detach(), fn._saved_result2.detach()

    @staticmethod
    def relayout_pays(x: torch.Tensor) -> bool:
        return group_norm_relayout_pays(x)

    @staticmethod
    def fused_backward(module: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor, stats,
                       ws: Workspace | None = None):
        """``(dx, sq, state)``: the layer's input gradient and its per-sample norms and
        grads from one folded ``native_group_norm_backward`` call."""
        dx, gw, gb = group_norm_fused_backward(x, g, module.num_groups, stats, module.weight,
                                               workspace=ws)
        state = (gw if _trainable(module, "weight") else None,
                 gb if _trainable(module, "bias") else None)
        return dx, _sq_of(state), state

    @staticmethod
    def norms(module: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor,
              ws: Workspace | None = None, y: torch.Tensor | None = None,
              stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        gw, gb = group_norm_per_sample_grads(x, g, module.num_groups, module.eps, y=y,
                                             weight=module.weight, bias=module.bias,
                                             workspace=ws, stats=stats)
        state = (gw if _trainable(module, "weight") else None,
                 gb if _trainable(module, "bias") else None)
        return _sq_of(state), state

    @staticmethod
    def sums(module, state: Any, coef: torch.Tensor) -> Sums:
        return _per_sample_rule_sums(state, ("weight", "bias"), coef)


class EmbeddingRule(_Rule):
    """``nn.Embedding`` (dense, no ``max_norm``): ghost norms, ``index_add`` sums."""

    @staticmethod
    def check(module: nn.Module) -> None:
        bad = [f"{k}={getattr(module, k)!r}" for k in ("max_norm", "sparse", "scale_grad_by_freq")
               if getattr(module, k)]
        if bad:
            raise UnsupportedLayerError(f"Embedding with {', '.join(bad)} is not supported")

    @staticmethod
    def norms(module: nn.Embedding, x: torch.Tensor, g: torch.Tensor,
              ws: Workspace | None = None):
        return embedding_sq_norms(x, g, padding_idx=module.padding_idx), (x, g)

    @staticmethod
    def sums(module: nn.Embedding, state: Any, coef: torch.Tensor) -> Sums:
        x, g = state
        w = embedding_clipped_sum(x, g, coef, module.num_embeddings,
                                  padding_idx=module.padding_idx)
        return {"weight": w}


#: Layer types the engine clips exactly (exact type match: subclasses may change forward).
RULES: dict[type[nn.Module], type] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.GroupNorm: GroupNormRule,
    nn.Embedding: EmbeddingRule,
}


def supported_layer_names() -> str:
    """Comma-separated class names of :data:`RULES` (for error messages)."""
    return ", ".join(t.__name__ for t in RULES)
