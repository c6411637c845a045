import torch

from erq_core.stats import LayerStats, augment


def test_streamed_statistics_equal_the_one_shot_computation():
    torch.manual_seed(0)
    x = torch.randn(600, 24)
    xq = torch.round(x * 4) / 4
    weight, bias = torch.randn(40, 24), torch.randn(40)
    y = x @ weight.T + bias
    narrow = torch.randn(10, 24)  # d_out < d_in + 1: Xqa^T Y is accumulated instead of K
    y_narrow = x @ narrow.T

    streamed, streamed_narrow = LayerStats(24, 40), LayerStats(24, 10)
    for rows in torch.split(torch.arange(600), 130):
        streamed.add_batch(x[rows], xq[rows], y[rows])
        streamed_narrow.add_batch(x[rows], xq[rows], y_narrow[rows])

    xa, xqa = augment(x.double()), augment(xq.double())
    H, K = xqa.T @ xqa, xqa.T @ xa
    assert streamed.count == 600
    assert torch.allclose(streamed.H, H, rtol=1e-5, atol=1e-3)
    assert torch.allclose(streamed.K, K, rtol=1e-5, atol=1e-3)
    assert torch.allclose(streamed_narrow.H, H, rtol=1e-5, atol=1e-3)
    assert streamed_narrow.K is None
    assert torch.allclose(streamed_narrow.XqY, xqa.T @ y_narrow.double(), rtol=1e-5, atol=1e-3)
    assert abs(streamed.output_sq - float(y.double().pow(2).sum())) < 1e-6 * streamed.output_sq
    # both paths give the same K Wa^T
    wa = torch.cat([weight, bias[:, None]], dim=1).double()
    assert torch.allclose(streamed.output_cross(wa, True), K @ wa.T, rtol=1e-5, atol=1e-2)
    wn = torch.cat([narrow, torch.zeros(10, 1)], dim=1).double()
    assert torch.allclose(streamed_narrow.output_cross(wn, True), K @ wn.T, rtol=1e-5, atol=1e-2)


def test_statistics_memory_does_not_depend_on_the_number_of_rows():
    stats = LayerStats(16, 8)
    sizes = {t.numel() for t in (stats.H, stats.XqY)}
    for _ in range(5):
        x = torch.randn(1000, 16)
        stats.add_batch(x, x, x[:, :8])
    assert {t.numel() for t in (stats.H, stats.XqY)} == sizes
