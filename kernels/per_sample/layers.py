"""Per-layer-type rules of the book-keeping engine: what to check, keep and sum.

Each rule turns one layer call (its input ``x`` and the gradient ``g`` w.r.t. its output)
into a ``state`` (:meth:`collect`, or :meth:`fused_backward` which also returns the input
gradient) from which, once the backward pass is done, :meth:`norms` gives the per-sample
norms of the layer's trainable parameters and :meth:`sums` ``sum_i coef_i * grad_i`` per
parameter. The engine passes ``names`` (the layer's trainable parameters, fixed when it
attached) and has the rule write into its own buffers:

* ``norms`` fills ``out``, ``(len(names), B)`` rows of the step's norm buffer (zeros on
  entry), so that ``||grad_i||^2 = sum_r out[r, i]^2`` over the layer's rows (a rule may use
  fewer rows than names; the rest stay zero);
* ``sums`` writes ``sum_i coef_i * grad_i`` into ``out[name]`` for every name, views of the
  step's flat gradient buffer shaped like the parameters.

Only the heavy per-sample work runs in the backward pass (in ``collect``, while ``g`` is
fresh); the small norm ops all run together after it. ``collect`` takes the layer's
:class:`~kernels.per_sample.workspace.Workspace` (``ws``) for scratch that lives across
steps; ``state`` may point into it until the step's ``sums``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .clip import mm_into, norms_into, weighted_sum_into
from .conv import conv_per_sample_grads
from .embedding import embedding_clipped_sum, embedding_sq_norms
from .group_norm import (
    group_norm_fused_backward,
    group_norm_per_sample_grads,
    group_norm_relayout_pays,
)
from .linear import linear_sq_norms
from .workspace import Workspace


class UnsupportedLayerError(ValueError):
    """A layer with trainable parameters that the book-keeping engine cannot clip exactly."""


Names = tuple[str, ...]
Outs = dict[str, torch.Tensor]


class _Materialised:
    """Rules whose state is the per-sample grads themselves, one ``(B, ...)`` per name."""

    @staticmethod
    def norms(module: nn.Module, state: tuple[torch.Tensor, ...], names: Names,
              out: torch.Tensor) -> None:
        for i, t in enumerate(state):
            norms_into(out[i], t)

    @staticmethod
    def sums(module: nn.Module, state: tuple[torch.Tensor, ...], coef: torch.Tensor,
             out: Outs) -> None:
        for t, dst in zip(state, out.values(), strict=True):
            weighted_sum_into(dst, t, coef)


class _Rule:
    """Defaults: any configuration is supported; the layer output is not kept."""

    #: Ask the engine to keep the (unmodified) layer output for :meth:`collect` (``y=``), and
    #: what :meth:`saved_stats` finds in its autograd node (``stats=``).
    keeps_output = False
    #: The rule can take over the layer's backward (:meth:`fused_backward`) of a contiguous
    #: input: the input gradient and the per-sample grads from one computation. Needs
    #: :meth:`saved_stats`; :meth:`relayout_pays` says when to run on a contiguous copy.
    fuses_backward = False

    @staticmethod
    def relayout_pays(x: torch.Tensor) -> bool:
        """Whether the layer should run on a contiguous copy of ``x`` (to be fused)."""
        return False

    @staticmethod
    def saved_stats(output: torch.Tensor) -> Any:
        """Tensors the layer's forward saved for its backward that :meth:`collect` can reuse."""
        return None

    @staticmethod
    def check(module: nn.Module) -> None:
        return None


class LinearRule(_Rule):
    """``nn.Linear``: exact ``||a|| ||g||`` norms (ghost norm with a sequence dim)."""

    @staticmethod
    def collect(module: nn.Linear, x: torch.Tensor, g: torch.Tensor, names: Names,
                ws: Workspace | None = None) -> Any:
        if x.dim() < 2:
            raise ValueError(f"Linear input needs a batch dimension, got shape {tuple(x.shape)}")
        return x, g

    @staticmethod
    def norms(module: nn.Linear, state: Any, names: Names, out: torch.Tensor) -> None:
        x, g = state
        w_on, b_on = "weight" in names, "bias" in names
        if x.dim() == 2:  # ||dW_i|| = ||a_i|| ||g_i||, ||db_i|| = ||g_i||: three reductions
            g_norm = torch.linalg.vector_norm(g, dim=1) if not b_on else norms_into(
                out[names.index("bias")], g)
            if w_on:
                torch.mul(torch.linalg.vector_norm(x, dim=1), g_norm,
                          out=out[names.index("weight")])
        elif w_on:
            torch.sqrt(linear_sq_norms(x, g, bias=b_on), out=out[0])
        else:
            norms_into(out[0], g.sum(dim=tuple(range(1, g.dim() - 1))))

    @staticmethod
    def sums(module: nn.Linear, state: Any, coef: torch.Tensor, out: Outs) -> None:
        """``(c * G)^T A`` and ``sum(c * G)``: the GEMM the non-private backward runs."""
        x, g = state
        gc = g * coef.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
        g2 = gc.reshape(-1, gc.shape[-1])
        if "weight" in out:
            mm_into(out["weight"], g2.t(), x.reshape(-1, x.shape[-1]))
        if "bias" in out:
            if out["bias"].dtype == g2.dtype:
                torch.sum(g2, 0, out=out["bias"])
            else:
                out["bias"].copy_(g2.sum(0))


class ConvRule(_Materialised, _Rule):
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
    def collect(module, x: torch.Tensor, g: torch.Tensor, names: Names,
                ws: Workspace | None = None) -> Any:
        x, padding = ConvRule._explicit_padding(module, x)
        b_on = "bias" in names
        if "weight" in names:
            gw, gb = conv_per_sample_grads(
                x, g, module.weight.shape, stride=module.stride, padding=padding,
                dilation=module.dilation, groups=module.groups, bias=b_on, workspace=ws,
            )
        else:
            gw, gb = None, g.sum(dim=tuple(range(2, g.dim())))
        return tuple({"weight": gw, "bias": gb}[n] for n in names)


class GroupNormRule(_Materialised, _Rule):
    """``nn.GroupNorm`` (affine): per-sample grads are ``(B, C)``, cheap to hold."""

    #: The saved statistics enable the folded path (contiguous input) and the stats path
    #: (other layouts); the (unmodified) output the output path, if there are none.
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
                       names: Names, ws: Workspace | None = None):
        """``(dx, state)``: the layer's input gradient and its per-sample grads from one
        folded ``native_group_norm_backward`` call."""
        dx, gw, gb = group_norm_fused_backward(x, g, module.num_groups, stats, module.weight,
                                               workspace=ws)
        return dx, tuple({"weight": gw, "bias": gb}[n] for n in names)

    @staticmethod
    def collect(module: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor, names: Names,
                ws: Workspace | None = None, y: torch.Tensor | None = None,
                stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        gw, gb = group_norm_per_sample_grads(x, g, module.num_groups, module.eps, y=y,
                                             weight=module.weight, bias=module.bias,
                                             workspace=ws, stats=stats)
        return tuple({"weight": gw, "bias": gb}[n] for n in names)


class EmbeddingRule(_Rule):
    """``nn.Embedding`` (dense, no ``max_norm``): ghost norms, ``index_add`` sums."""

    @staticmethod
    def check(module: nn.Module) -> None:
        bad = [f"{k}={getattr(module, k)!r}" for k in ("max_norm", "sparse", "scale_grad_by_freq")
               if getattr(module, k)]
        if bad:
            raise UnsupportedLayerError(f"Embedding with {', '.join(bad)} is not supported")

    @staticmethod
    def collect(module: nn.Embedding, x: torch.Tensor, g: torch.Tensor, names: Names,
                ws: Workspace | None = None) -> Any:
        return x, g

    @staticmethod
    def norms(module: nn.Embedding, state: Any, names: Names, out: torch.Tensor) -> None:
        x, g = state
        torch.sqrt(embedding_sq_norms(x, g, padding_idx=module.padding_idx), out=out[0])

    @staticmethod
    def sums(module: nn.Embedding, state: Any, coef: torch.Tensor, out: Outs) -> None:
        x, g = state
        embedding_clipped_sum(x, g, coef, module.num_embeddings,
                              padding_idx=module.padding_idx, out=out["weight"])


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
