"""The whole pipeline on the bundled fixture: ERQ must beat round-to-nearest."""

from erq_core import ErqConfig, run
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL, FIXTURE_VAL_LIMIT


def test_at_2_bit_weights_erq_keeps_what_rtn_loses_and_erq_plus_keeps_more(tmp_path):
    """At W4/A4 the fixture separates no method (all within a few images of FP); at 2-bit weights
    round-to-nearest loses many points, ERQ's error reduction keeps most of them, and erq+ more."""
    results = {}
    for method in ("rtn", "erq", "erq+"):
        results[method] = run(ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), method=method,
                                        w_bits=2, a_bits=4, val_limit=FIXTURE_VAL_LIMIT), tmp_path / method,
                              device="cpu")
    fp = results["erq"]["fp"]["top1"]
    assert results["rtn"]["fp"] == results["erq"]["fp"] and results["erq"]["n_val"] == FIXTURE_VAL_LIMIT
    top1 = {method: result["quantized"]["top1"] for method, result in results.items()}
    print(top1, "FP", fp)
    assert top1["rtn"] < fp - 10
    assert top1["erq"] > fp - 6 and top1["erq"] > top1["rtn"] + 5
    assert top1["erq+"] > top1["erq"] + 1  # at least 5 of the 500 images


def test_metrics_report_every_layer_and_stage(erq_w4a4_run):
    _, metrics = erq_w4a4_run
    assert metrics["fp"]["top1"] > 75
    names = [layer["name"] for layer in metrics["layers"]]
    assert names[0] == "patch_embed.proj" and names[-1] == "head" and len(names) == 1 + 4 * 4 + 1
    for layer in metrics["layers"][1:]:
        assert layer["wqer"] < layer["rtn"], layer
    for stage in ("calibrate_activations", "reparameterize", "collect_statistics", "aqer", "wqer", "evaluate"):
        assert metrics["seconds"][stage] >= 0
    assert metrics["peak_memory_bytes"] > 0


def test_progress_reports_every_stage_in_order(tmp_path):
    calls = []
    run(ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), val_limit=64),
        tmp_path, device="cpu", progress=lambda stage, done, total: calls.append((stage, done, total)))
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == ["load_model", "evaluate_fp", "calibrate_activations", "collect_statistics", "aqer",
                      "calibrate_weights", "wqer", "evaluate", "save"]
    for stage in stages:
        done = [d for s, d, _ in calls if s == stage]
        assert done == sorted(done) and done[-1] == max(t for s, _, t in calls if s == stage)


def test_same_config_and_folder_give_the_same_result(tmp_path):
    config = ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), evaluate=False, w_bits=3)
    run(config, tmp_path, device="cpu")
    first = (tmp_path / "quantized.safetensors").read_bytes()
    run(config, tmp_path, device="cpu")
    assert (tmp_path / "quantized.safetensors").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
