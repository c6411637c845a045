import pytest
import timm
import torch

from erq_core import ConfigError, ErqConfig
from erq_core.errors import ModelLoadError
from erq_core.qmodules import convert_model
from erq_core.registry import MODEL_ALIASES, supported_timm_names, validate_model_spec


def conversion_refused(name: str) -> bool:
    """Whether convert_model would refuse this architecture (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    try:
        convert_model(model, 4, 4, set(), set(), True)
    except ModelLoadError:
        return True
    return False


def test_timm_name_list_is_the_installed_families_less_what_conversion_refuses():
    installed = set()
    for module in ("vision_transformer", "deit", "swin_transformer"):
        installed |= set(timm.list_models(module=module))
    listed = supported_timm_names()
    assert listed <= installed
    left_out = installed - listed
    assert left_out and all(conversion_refused(name) for name in sorted(left_out))
    # building all 160 listed architectures takes minutes: the aliases and the left-out names' siblings
    siblings = {entry.timm_name for entry in MODEL_ALIASES.values()} | {
        "test_vit", "vit_base_patch16_224", "vit_so150m_patch16_reg4_gap_256", "vit_base_patch16_reg4_gap_256"}
    assert siblings <= listed and not [name for name in sorted(siblings) if conversion_refused(name)]


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
