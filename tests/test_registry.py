import pytest
import timm

from erq_core import ConfigError, ErqConfig
from erq_core.registry import MODEL_ALIASES, supported_timm_names, validate_model_spec


def test_timm_name_list_matches_the_installed_timm():
    installed = set()
    for module in ("vision_transformer", "deit", "swin_transformer"):
        installed |= set(timm.list_models(module=module))
    assert supported_timm_names() == installed


def test_aliases_name_real_timm_models():
    assert set(MODEL_ALIASES) == {"vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base",
                                  "swin_tiny", "swin_small", "swin_base"}
    for entry in MODEL_ALIASES.values():
        assert timm.is_model(entry.timm_name)
    assert MODEL_ALIASES["deit_small"].preprocessing == {"crop_pct": 0.875}


@pytest.mark.parametrize("spec", ["deit_small", "vit_base_patch16_224", "vit_small_patch16_224.augreg_in21k",
                                  "hf-hub:timm/deit_small_patch16_224.fb_in1k", "local-dir:/models/x"])
def test_accepted_model_specs(spec):
    validate_model_spec(spec)


@pytest.mark.parametrize("spec", ["resnet50", "deit_smal", "hf-hub:nope", "local-dir:", ""])
def test_refused_model_specs(spec):
    with pytest.raises(ConfigError):
        validate_model_spec(spec)


@pytest.mark.parametrize("field, value, message", [
    ("w_bits", 1, "w_bits must be an integer from 2 to 8"),
    ("a_bits", 9, "a_bits must be an integer from 2 to 8"),
    ("method", "gptq", "method must be one of"),
    ("coe", 0, "coe"),
    ("calib_size", 0, "calib_size"),
    ("val_limit", 0, "val_limit"),
])
def test_config_validation_says_what_to_fix(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ErqConfig(model="deit_small", dataset="/data", **{field: value}).validate()
