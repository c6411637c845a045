"""Aqer: activation quantization error reduction.

The layer fed with quantized input Xq should reproduce its full-precision output. With the bias
as an extra column, the weight update is a ridge regression with a closed form:
    dWa^T = (Xqa^T Xqa + lambda I)^-1 Xqa^T (Xa - Xqa) Wa^T = (H + lambda I)^-1 (K Wa^T - H Wa^T)
where K Wa^T = Xqa^T Y, Y the layer's FP output.
"""
from __future__ import annotations

from torch import Tensor

from erq_core.ridge import ridge_solve


def aqer_update(weight: Tensor, H: Tensor, output_cross: Tensor, lam: float) -> Tensor:
    """The Aqer-updated augmented weight Wa + dWa.

    weight (d_out, d_in[+1]) and H float64; output_cross = K Wa^T = Xqa^T Y, (d_in[+1], d_out).
    """
    delta_t = ridge_solve(H, output_cross - H @ weight.T, lam)
    return weight + delta_t.T
