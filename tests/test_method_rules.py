"""What distinguishes the methods, pinned: the paper's ridge plan from coe, the zero point after the
RepQ-ViT fold (fractional for erq as in the paper's code, integer for erq+), and the --no-aqer /
--no-wqer ablations."""
from __future__ import annotations

import pytest
import torch

from erq_core import QuantRecipe, quantize
from erq_core.layer import LayerPlan
from erq_core.pipeline import HEAD_AQER_LAMBDA, paper_plan
from erq_core.qmodules import QuantConv2d, QuantLinear
from tests.small_models import images, small_model



def quantized(**config):
    config = QuantRecipe(calib_size=8, **config)  # a recipe alone: no model or dataset to name
    return quantize(small_model("vit"), [images("vit", 8, seed=2)], config)


@pytest.fixture(scope="module")
def layers() -> dict:
    return dict(quantized(method="rtn").model.named_modules())


@pytest.mark.parametrize("aqer, wqer", [(True, True), (False, True), (True, False), (False, False)])
def test_the_paper_plan_takes_its_ridge_strengths_from_coe(layers, aqer, wqer):
    config = QuantRecipe(coe=2000.0, aqer=aqer, wqer=wqer)
    token_layer, head, patch = layers["blocks.0.mlp.fc1"], layers["head"], layers["patch_embed.proj"]
    assert isinstance(token_layer, QuantLinear) and isinstance(patch, QuantConv2d)
    wqer_lambda = 200.0 if wqer else None  # 0.1 coe
    assert paper_plan(token_layer, True, config) == LayerPlan(200.0 if aqer else None, wqer_lambda)
    # the head's input is one vector per image: Aqer's strength is a fixed 0.1, not 0.1 coe
    assert paper_plan(head, False, config) == LayerPlan(HEAD_AQER_LAMBDA if aqer else None, wqer_lambda)
    assert HEAD_AQER_LAMBDA == 0.1
    # the patch embedding's input (the image) is not quantized: no Aqer, Wqer with coe itself, unrefined
    assert paper_plan(patch, True, config) == LayerPlan(None, 2000.0 if wqer else None, refine_rounding=False)


@pytest.mark.parametrize("method", ["erq+", "repq", "rtn"])
def test_only_the_paper_method_uses_the_paper_plan(layers, method):
    config = QuantRecipe(method=method)
    assert paper_plan(layers["blocks.0.mlp.fc1"], True, config) == LayerPlan(None, None)


def folded_zero_points(model: torch.nn.Module, pairs: dict[str, str]) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    return [modules[linear].input_quantizer.zero_point for linear in pairs]  # {linear: its LayerNorm}


def test_the_fold_keeps_a_fractional_zero_point_for_erq_and_an_integer_one_for_erq_plus():
    """After the fold each folded input quantizer is per tensor with zero point mean(z_c): erq keeps
    it as it is (2^b + 1 reachable levels, as the paper's code does), erq+ rounds it (a true b-bit
    quantizer)."""
    paper, ours = quantized(method="erq"), quantized(method="erq+")
    assert paper.norm_linear_pairs and paper.norm_linear_pairs == ours.norm_linear_pairs
    for zero_points in (folded_zero_points(paper.model, paper.norm_linear_pairs),
                        folded_zero_points(ours.model, ours.norm_linear_pairs)):
        assert all(z.numel() == 1 for z in zero_points)
    assert any(z.item() != round(z.item()) for z in folded_zero_points(paper.model, paper.norm_linear_pairs))
    assert all(z.item() == round(z.item()) for z in folded_zero_points(ours.model, ours.norm_linear_pairs))


def test_erq_without_aqer_and_wqer_is_repq_bit_for_bit():
    """The ablations switch off exactly ERQ's two steps: what is left is RepQ-ViT."""
    ablated, repq = quantized(method="erq", aqer=False, wqer=False), quantized(method="repq")
    ablated_state, repq_state = ablated.model.state_dict(), repq.model.state_dict()
    assert ablated_state.keys() == repq_state.keys()
    assert all(torch.equal(ablated_state[key], repq_state[key]) for key in ablated_state)


def test_each_ablation_runs_only_its_own_step_and_both_steps_reduce_the_error_most():
    full, no_aqer, no_wqer = quantized(method="erq"), quantized(method="erq", aqer=False), \
        quantized(method="erq", wqer=False)
    for layer in no_aqer.layers[1:]:
        assert layer["aqer"] is None and layer["wqer"] is not None
    for layer in no_wqer.layers[1:]:
        assert layer["aqer"] is not None and layer["wqer"] is None
    final = lambda result: sum(layer["wqer"] or layer["aqer"] for layer in result.layers[1:])  # noqa: E731
    assert final(full) < min(final(no_aqer), final(no_wqer))
    # the same round-to-nearest start for all three
    assert [layer["rtn"] for layer in full.layers] == [layer["rtn"] for layer in no_aqer.layers]
