"""ErqConfig is the one description of a run: the CLI options and the REST body come from it."""
import dataclasses

import pytest

from erq_core import ConfigError, ErqConfig
from erq_core.cli import quantize_parser
from erq_core.config import fields
from service.schemas import JobRequest


def _cli_actions():
    return {action.dest: action for action in quantize_parser()._actions}


def test_every_rest_field_of_the_config_is_in_the_job_body_with_its_bounds():
    schema = JobRequest.model_json_schema()
    rest_fields = [spec for spec in fields() if spec.option.rest]
    assert set(schema["properties"]) == {spec.name for spec in rest_fields}
    for spec in rest_fields:
        prop = schema["properties"][spec.name]
        prop = next((alt for alt in prop.get("anyOf", []) if alt.get("type") != "null"), prop)
        for bound, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum")):
            expected = getattr(spec.option, bound)
            assert (prop.get(key) is None) == (expected is None), (spec.name, bound)
            if expected is not None:
                assert prop[key] == expected, (spec.name, bound)
        if spec.option.choices:
            choices = prop["items"] if spec.is_sequence else prop  # a list field: choices per entry
            assert tuple(choices.get("enum", [choices.get("const")])) == spec.option.choices
    assert set(schema["required"]) == {spec.name for spec in rest_fields if spec.option.required}


def test_every_cli_field_of_the_config_is_an_erq_quantize_option_with_its_default():
    actions = _cli_actions()
    parsed = vars(quantize_parser().parse_args(["--model", "m", "--dataset", "/d", "--out", "/o"]))
    for spec in fields():
        assert (spec.name in actions) == spec.option.cli, spec.name
        if spec.option.cli and not spec.option.required:
            expected = None if spec.default in ((), dataclasses.MISSING) else spec.default
            assert parsed[spec.name] == expected, spec.name


def test_the_defaults_of_a_bare_job_body_equal_the_config_defaults():
    body = JobRequest(model="deit_small", dataset="/data").model_dump()
    assert ErqConfig.from_dict(body) == ErqConfig(model="deit_small", dataset="/data")


@pytest.mark.parametrize("name, value", [("w_bits", 9), ("a_bits", 1), ("coe", 0), ("calib_size", 0),
                                         ("seed", -1), ("val_limit", 0), ("batch_size", 5000),
                                         ("max_drop", -0.5)])
def test_a_value_out_of_bounds_is_refused_by_the_config_and_the_job_body_alike(name, value):
    with pytest.raises(ConfigError, match=name):
        ErqConfig(model="deit_small", dataset="/data", **{name: value}).validate()
    with pytest.raises(ValueError):
        JobRequest(model="deit_small", dataset="/data", **{name: value})


def test_config_round_trips_through_its_dict():
    config = ErqConfig(model="deit_small", dataset="/data", w_bits=3, val_limit=10)
    assert ErqConfig.from_dict(config.to_dict()) == config


def test_a_job_spec_is_a_recipe_and_what_to_run_it_on():
    """quantize() takes a QuantRecipe; a job spec (ErqConfig) adds the model, data and outputs."""
    from erq_core import QuantRecipe

    config = ErqConfig(model="deit_small", dataset="/data", method="erq+", w_bits=3, export=("onnx",))
    assert config.recipe == QuantRecipe(method="erq+", w_bits=3) and config.recipe.calib_size == 192
    recipe_fields = {spec.name for spec in fields(QuantRecipe)}
    assert recipe_fields < {spec.name for spec in fields()}
    assert not recipe_fields & {"model", "dataset", "checkpoint", "random_init", "evaluate", "val_limit",
                                "batch_size", "export"}
    assert [spec.name for spec in fields()][:2] == ["model", "dataset"]  # what users see first
    assert ErqConfig.from_dict(config.to_dict()) == config
