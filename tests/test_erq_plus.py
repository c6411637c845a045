"""The parts of erq+ against computations on the activations themselves."""
import copy

import pytest
import torch

from erq_core import ConfigError, ErqConfig, load_quantized, run
from erq_core.config import DEFAULT_CALIB_SIZE
from erq_core.output_aware import linear_input_loss, search_uniform
from erq_core.qmodules import QuantLinear, convert_model, set_quant_state
from erq_core.quantizers import UniformQuantizer, fake_quantize, percentile_bounds, range_to_scale
from erq_core.reconstruct import reconstruct_block
from erq_core.sequential import asymmetric_statistics, fp_targets, model_tail, unit_inputs
from erq_core.stats import augment
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL
from tests.small_models import images, small_model


def quantized_and_fp(kind: str = "vit") -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A small model with calibrated 4-bit activation quantizers (weights FP), and its FP twin."""
    model = small_model(kind)
    x = images(kind, n=8)
    convert_model(model, 4, 4, set(), set(), True)
    set_quant_state(model, activations=True, weights=False)
    with torch.no_grad():
        model(x)
    fp = copy.deepcopy(model)
    set_quant_state(fp, activations=False, weights=False)
    return model, fp, x


def layer_input_output(model, layer, x):
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, o: seen.update(input=a[0], output=o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["input"], seen["output"]


@pytest.mark.parametrize("name", ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"])  # widens (K), narrows (Xqa^T Y)
def test_asymmetric_statistics_take_inputs_from_the_quantized_model_and_targets_from_the_fp_one(name):
    q_model, fp_model, x = quantized_and_fp()
    used = len(x) - 3  # statistics from the leading images only, as with more calibration batches than stats
    q_layer, fp_layer = q_model.get_submodule(name), fp_model.get_submodule(name)
    q_unit, fp_unit = q_model.blocks[1], fp_model.blocks[1]
    targets, outputs = fp_targets(fp_unit, {name: fp_layer}, unit_inputs(fp_model, fp_unit, [x]), stats_images=used)
    stats = asymmetric_statistics(q_unit, q_layer, unit_inputs(q_model, q_unit, [x[:used]]), targets[name]).total()

    seen, _ = layer_input_output(q_model, q_layer, x[:used])
    fp_input, fp_output = layer_input_output(fp_model, fp_layer, x[:used])
    xq = augment(q_layer.input_quantizer.quantize(seen).reshape(-1, seen.shape[-1])).double()
    y = fp_output.reshape(-1, fp_output.shape[-1]).double()
    weight = torch.cat([fp_layer.weight, fp_layer.bias[:, None]], dim=1).double()
    assert stats.count == xq.shape[0]
    torch.testing.assert_close(stats.gram(True), xq.T @ xq, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.output_cross(weight, True), xq.T @ y, rtol=1e-4, atol=1e-3)
    assert stats.output_sq == pytest.approx(float(y.pow(2).sum()), rel=1e-6)
    # the premise: upstream quantization changed the layer's input, so FP statistics would differ
    fp_xq = augment(q_layer.input_quantizer.quantize(fp_input).reshape(-1, seen.shape[-1])).double()
    assert not torch.allclose(stats.gram(True), fp_xq.T @ fp_xq, rtol=1e-3)
    # the same FP forward gave the block's output, for every image
    block_output = layer_input_output(fp_model, fp_unit, x)[1]
    assert torch.equal(outputs[0], block_output)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_the_model_tail_continues_the_forward_from_the_last_unit(kind):
    from erq_core.sequential import transformer_units

    model = small_model(kind).eval()
    x = images(kind, n=4)
    last = transformer_units(model)[-1][1]
    with torch.no_grad():
        last_output = last(unit_inputs(model, last, [x])[0])
        assert torch.equal(model_tail(model)(last_output), model(x))


def test_output_aware_range_ignores_outliers_in_a_channel_the_layer_does_not_read():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    x[::50, 0] = 40.0  # outliers in channel 0 ...
    weight = torch.randn(8, 16, generator=g)
    weight[:, 0] = 0.0  # ... which the layer ignores
    quantizer = UniformQuantizer(4)
    quantizer.calibrate(x)  # the activation-MSE range
    loss = linear_input_loss(x, weight)

    def output_loss(scale, zero):
        return float(loss(lambda t: fake_quantize(t, scale, zero, 4)))

    mse_loss = output_loss(quantizer.scale, quantizer.zero_point)
    lower = -quantizer.zero_point * quantizer.scale
    search_uniform(quantizer, x, loss)
    searched = output_loss(quantizer.scale, quantizer.zero_point)
    assert searched < 0.5 * mse_loss
    # no upper end among the percentile candidates, with the starting lower end, does better
    uppers, _ = percentile_bounds(x.reshape(-1, 1), (0.99, 0.999, 0.9999, 1.0), dim=0)
    for upper in uppers.reshape(-1):
        assert searched <= output_loss(*range_to_scale(upper.reshape(1), lower.reshape(1), 4)) + 1e-6


def block_to_reconstruct() -> tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """The first block of a small model with quantized weights, its input and its FP output."""
    q_model, fp_model, x = quantized_and_fp()
    for layer in q_model.modules():
        if isinstance(layer, QuantLinear):
            layer.weight_quantizer.calibrate(layer.weight.detach())
            layer.quantize_weight = True
    block, fp_block = q_model.blocks[0], fp_model.blocks[0]
    inputs = unit_inputs(q_model, block, [x])
    with torch.no_grad():
        targets = [fp_block(t) for t in unit_inputs(fp_model, fp_block, [x])]
    return block, inputs, targets


def test_block_reconstruction_lowers_the_blocks_output_error_and_keeps_weights_on_the_grid():
    block, inputs, targets = block_to_reconstruct()
    with torch.no_grad():
        direct_before = float((block(inputs[0]) - targets[0]).pow(2).mean())
    before, after = reconstruct_block(block, inputs, targets, iterations=60, batch_size=8)
    with torch.no_grad():
        direct_after = float((block(inputs[0]) - targets[0]).pow(2).mean())
    assert before == pytest.approx(direct_before, rel=1e-4)
    assert after == pytest.approx(direct_after, rel=1e-4)
    assert after < 0.95 * before
    for layer in block.modules():
        if isinstance(layer, QuantLinear):
            torch.testing.assert_close(layer.weight_quantizer(layer.weight.detach()), layer.weight.detach())


def test_block_reconstruction_reports_each_step_and_stops_when_its_progress_callback_raises():
    """The callback is where a job is stopped: raising there ends the block's learning at once, with the
    block as it was (nothing committed, its modules' own forwards back)."""
    block, inputs, targets = block_to_reconstruct()
    with torch.no_grad():
        output_before = block(inputs[0])
    weights_before = {name: p.detach().clone() for name, p in block.named_parameters()}
    steps = []

    class Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        steps.append((done, total))
        if done == 5:
            raise Stop()

    with pytest.raises(Stop):
        reconstruct_block(block, inputs, targets, iterations=10_000, batch_size=8, progress=progress)
    assert steps == [(done, 10_000) for done in range(1, 6)]
    for name, parameter in block.named_parameters():
        torch.testing.assert_close(parameter.detach(), weights_before[name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(block(inputs[0]), output_before, rtol=0, atol=0)


def test_reconstruct_runs_end_to_end_on_cpu_with_tiny_settings(tmp_path):
    config = ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), method="erq+", reconstruct=True,
                       reconstruct_iters=3, reconstruct_images=16, calib_size=16, val_limit=64)
    metrics = run(config, tmp_path, device="cpu")
    assert metrics["seconds"]["reconstruct"] > 0 and metrics["quantized"]["top1"] > 50
    assert load_quantized(tmp_path) is not None


def test_reconstruct_needs_erq_plus():
    with pytest.raises(ConfigError, match="erq\\+"):
        ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), method="erq", reconstruct=True).validate()


def test_each_method_has_its_calibration_default_and_an_explicit_size_wins():
    spec = dict(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET))
    assert ErqConfig(**spec, method="erq").calib_size == 32  # the paper's
    assert ErqConfig(**spec, method="erq+").calib_size == DEFAULT_CALIB_SIZE["erq+"] > 32
    assert ErqConfig(**spec, method="erq+", calib_size=48).calib_size == 48
    assert ErqConfig(**spec, method="erq+", reconstruct=True, reconstruct_images=300).images_needed == 300
