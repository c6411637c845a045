"""Per-layer calibration statistics, streamed over batches.

Aqer, Wqer and the per-layer error report need, per layer, the Gram matrix of the quantized
augmented input H = Xqa^T Xqa, its cross term with the FP input K = Xqa^T Xa (used only as
K Wa^T = Xqa^T Y, Y the FP output) and ||Y||^2. No activation is kept: memory is
O(d_in^2) per layer, whatever the calibration size.

Xqa^T Y costs N (d_in+1) d_out per batch against N (d_in+1)^2 for K, so a layer that narrows
(fc2, proj) accumulates Xqa^T Y directly and a layer that widens (qkv, fc1) accumulates K.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def augment(x: Tensor) -> Tensor:
    """[x, 1]: the ones column carries the bias."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


@dataclass
class FPRows:
    """What a layer's statistics take from the FP model for a batch of images (along dim 0): its
    input X (for K) or its output Y (for Xqa^T Y), whichever LayerStats.keeps_cross says it
    needs, and each image's ||Y||^2. One FP forward of a block can then serve all its layers."""

    input: Optional[Tensor]
    output: Optional[Tensor]
    output_sq: Tensor  # (images,), float64

    @classmethod
    def of(cls, x: Tensor, y: Tensor, keep_input: bool = True, keep_output: bool = True) -> "FPRows":
        squares = y.double().pow_(2) if y.dtype != torch.float64 else y.pow(2)  # pow_ on the copy .double() made
        return cls(x if keep_input else None, y if keep_output else None, squares.reshape(y.shape[0], -1).sum(dim=1))

    def images(self, index: slice) -> "FPRows":
        return FPRows(None if self.input is None else self.input[index],
                      None if self.output is None else self.output[index], self.output_sq[index])

    @property
    def token_input(self) -> bool:
        """False for a 2-D (image, feature) input: the classifier head."""
        return (self.input if self.input is not None else self.output).dim() > 2


class LayerStats:
    """H, K (or Xqa^T Y) and ||Y||^2 of one layer, in float64, from float32 batch products."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str = "cpu",
                 input_quantized: bool = True, keep_cross: Optional[bool] = None):
        size = in_features + 1
        self.input_quantized = input_quantized
        if keep_cross is None:
            keep_cross = input_quantized and self.keeps_cross(in_features, out_features)
        self.H = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.K = torch.zeros(size, size, dtype=torch.float64, device=device) if keep_cross else None
        needs_output_cross = input_quantized and not keep_cross
        self.XqY = torch.zeros(size, out_features, dtype=torch.float64, device=device) if needs_output_cross else None
        self.output_sq = 0.0
        self.count = 0
        self.token_input = True  # False for a 2-D (image, feature) input: the classifier head

    @staticmethod
    def keeps_cross(in_features: int, out_features: int) -> bool:
        """Whether a layer with a quantized input accumulates K (it widens) or Xqa^T Y (it narrows)."""
        return out_features > in_features + 1

    @torch.no_grad()
    def add_batch(self, x: Tensor, xq: Tensor, y: Tensor) -> None:
        """x: FP input rows (tokens, d_in); xq: the same rows quantized; y: the FP output rows."""
        self.add_rows(xq, FPRows.of(x, y))

    @torch.no_grad()
    def add_rows(self, xq: Tensor, fp: FPRows) -> None:
        """xq: the layer's quantized input rows; fp: the FP model's rows of the same images."""
        rows = lambda t: t.reshape(-1, t.shape[-1]).float()  # noqa: E731
        xqa = augment(rows(xq)) if self.input_quantized else augment(rows(fp.input))
        self.H += (xqa.T @ xqa).double()
        if self.K is not None:
            self.K += (xqa.T @ augment(rows(fp.input))).double()
        if self.XqY is not None:
            self.XqY += (xqa.T @ rows(fp.output)).double()
        self.output_sq += float(fp.output_sq.sum())
        self.count += xqa.shape[0]

    def merged(self, other: "LayerStats") -> "LayerStats":
        """The statistics of both sets of rows."""
        total = copy.copy(self)
        total.H = self.H + other.H
        total.K = None if self.K is None else self.K + other.K
        total.XqY = None if self.XqY is None else self.XqY + other.XqY
        total.output_sq = self.output_sq + other.output_sq
        total.count = self.count + other.count
        return total

    def gram(self, with_bias: bool) -> Tensor:
        return self.H if with_bias else self.H[:-1, :-1]

    def cross(self, with_bias: bool) -> Tensor:
        """K = Xqa^T Xa (H itself when the input is not quantized)."""
        if self.K is None and self.input_quantized:
            raise ValueError("K was not accumulated for this layer; use output_cross()")
        K = self.H if self.K is None else self.K
        return K if with_bias else K[:-1, :-1]

    def output_cross(self, reference: Tensor, with_bias: bool) -> Tensor:
        """Xqa^T Y = K Wa^T for the weight `reference` the FP output was computed with."""
        if self.XqY is not None:
            return self.XqY if with_bias else self.XqY[:-1]
        return self.cross(with_bias) @ reference.T


class FoldedStats:
    """LayerStats of two halves of the calibration images (alternate images) and their sum.

    Each half can check a solve fitted on the other one, which is how ridge strengths are chosen
    without a hand-tuned knob.
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device | str = "cpu",
                 input_quantized: bool = True):
        self.folds = tuple(LayerStats(in_features, out_features, device, input_quantized) for _ in range(2))

    @torch.no_grad()
    def add_batch(self, x: Tensor, xq: Tensor, y: Tensor) -> None:
        """x, xq, y with the images along dim 0: (images, tokens, features) or (images, features)."""
        self.add_rows(xq, FPRows.of(x, y))

    @torch.no_grad()
    def add_rows(self, xq: Tensor, fp: FPRows) -> None:
        self.token_input = fp.token_input
        for start, fold in enumerate(self.folds):
            if xq[start::2].shape[0]:
                fold.add_rows(xq[start::2], fp.images(slice(start, None, 2)))

    @property
    def token_input(self) -> bool:
        return self.folds[0].token_input

    @token_input.setter
    def token_input(self, value: bool) -> None:
        for fold in self.folds:
            fold.token_input = value

    def total(self) -> LayerStats:
        return self.folds[0].merged(self.folds[1])
