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
from typing import Optional

import torch
from torch import Tensor


def augment(x: Tensor) -> Tensor:
    """[x, 1]: the ones column carries the bias."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


class LayerStats:
    """H, K (or Xqa^T Y) and ||Y||^2 of one layer, in float64, from float32 batch products."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str = "cpu",
                 input_quantized: bool = True, keep_cross: Optional[bool] = None):
        size = in_features + 1
        self.input_quantized = input_quantized
        if keep_cross is None:
            keep_cross = input_quantized and out_features > size
        self.H = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.K = torch.zeros(size, size, dtype=torch.float64, device=device) if keep_cross else None
        needs_output_cross = input_quantized and not keep_cross
        self.XqY = torch.zeros(size, out_features, dtype=torch.float64, device=device) if needs_output_cross else None
        self.output_sq = 0.0
        self.count = 0
        self.token_input = True  # False for a 2-D (image, feature) input: the classifier head

    @torch.no_grad()
    def add_batch(self, x: Tensor, xq: Tensor, y: Tensor) -> None:
        """x: FP input rows (tokens, d_in); xq: the same rows quantized; y: the FP output rows."""
        x = x.reshape(-1, x.shape[-1]).float()
        xqa = augment(xq.reshape(-1, xq.shape[-1]).float()) if self.input_quantized else augment(x)
        self.H += (xqa.T @ xqa).double()
        if self.K is not None:
            self.K += (xqa.T @ augment(x)).double()
        if self.XqY is not None:
            self.XqY += (xqa.T @ y.reshape(-1, y.shape[-1]).float()).double()
        self.output_sq += float(y.double().pow(2).sum())
        self.count += x.shape[0]

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
        for start, fold in enumerate(self.folds):
            if x[start::2].shape[0]:
                fold.add_batch(x[start::2], xq[start::2], y[start::2])

    @property
    def token_input(self) -> bool:
        return self.folds[0].token_input

    @token_input.setter
    def token_input(self, value: bool) -> None:
        for fold in self.folds:
            fold.token_input = value

    def total(self) -> LayerStats:
        return self.folds[0].merged(self.folds[1])
