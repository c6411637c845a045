"""The one description of a quantization run, shared by the CLI, the REST schema and checkpoints.

Every field of `ErqConfig` carries its `Option`: help text, bounds, choices and command-line
spellings. `erq quantize`'s options (erq_core/cli.py) and the REST job body (service/schemas.py)
are generated from them, and `validate()` checks the same bounds, so a new field or a changed
bound is written here once.

This module is deliberately light (no torch, no timm): the API process validates job
parameters with it without loading the engine.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional

from erq_core.errors import ConfigError
from erq_core.registry import validate_model_spec


@dataclass(frozen=True)
class MethodSpec:
    """What a method does, read by the pipeline, the checkpoint and the config in one place."""

    name: str
    default_calib_size: int  # the paper calibrates on 32 images; erq+ takes more where its measured curve pays
    reparameterized: bool  # folds RepQ-ViT's LayerNorm reparameterization; log-sqrt2 post-softmax quantizer
    integer_zero_point: bool  # activation quantizers keep integer zero points (after the fold: a true b-bit
    # quantizer; the paper methods keep the fractional mean there, which onnx-int8's kernels cannot take)
    solver: Optional[str]  # "paper": ERQ's per-layer Aqer/Wqer; "sequential": erq+; None: no error reduction
    reconstructs: bool = False  # --reconstruct may refine its solution
    # the TPAMI two-part weights (the folded layers' outlier input columns on a grid of their own) below
    # this many weight bits; above, one grid per output channel
    two_part_below_bits: int = 33
    # erq_core.balance: each attention's output channels balanced (an exact fold) below this many
    # activation bits, unless the model is rotated
    balance_below_a_bits: int = 0
    # the same for the queries and keys (erq_core.balance)
    balance_qk_below_a_bits: int = 0


METHOD_SPECS = {spec.name: spec for spec in (
    MethodSpec("erq", 32, reparameterized=True, integer_zero_point=False, solver="paper"),
    # erq+ at 8 bits: a second grid gains nothing there and costs onnx-int8 a second product per folded
    # layer (docs/export.md, "Two-part weights at 8 bits")
    MethodSpec("erq+", 192, reparameterized=True, integer_zero_point=True, solver="sequential", reconstructs=True,
               two_part_below_bits=8, balance_below_a_bits=5, balance_qk_below_a_bits=7),
    MethodSpec("repq", 32, reparameterized=True, integer_zero_point=False, solver=None),
    MethodSpec("rtn", 32, reparameterized=False, integer_zero_point=True, solver=None),
)}
METHODS = tuple(METHOD_SPECS)
REPARAMETERIZED = tuple(name for name, spec in METHOD_SPECS.items() if spec.reparameterized)
DEFAULT_CALIB_SIZE = {name: spec.default_calib_size for name, spec in METHOD_SPECS.items()}
INTEGER_ZERO_POINT_METHODS = tuple(name for name, spec in METHOD_SPECS.items() if spec.integer_zero_point)
EXPORT_FORMATS = ("onnx", "onnx-float64", "onnx-int8", "onnx-w4")
# onnx-int8's 8-bit weights (`erq export --int8-weights`; erq_core.onnx_integer): "signed" puts them all on
# onnxruntime's u8s8 kernel (exact with VNNI or on ARM; on other x86 CPUs with the session entry that
# erq_core.onnx_session sets), "exact" keeps them on the u8u8 kernel wherever u8s8 could saturate
INT8_WEIGHTS = ("exact", "signed")
DEFAULT_INT8_WEIGHTS = "signed"
ACT_GRANULARITIES = ("tensor", "token")  # static per-tensor ranges (the paper's), or dynamic per-token ones
PRECISIONS = ("float32", "float64")  # what a saved model is evaluated in (erq_core.float64)
MIN_BITS, MAX_BITS = 2, 8
MAX_CALIB_SIZE = 100_000
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**31 - 1
MAX_VAL_LIMIT = 10_000_000
MAX_COE = 1e12
RECONSTRUCT_ITERS = 500
RECONSTRUCT_IMAGES = 256


@dataclass(frozen=True)
class Option:
    """How a config field is offered to users: help, bounds, choices and CLI spellings."""

    help: str
    flags: tuple[str, ...] = ()  # command-line spellings, the first is the documented one
    negative_flag: Optional[str] = None  # a True-by-default switch turned off on the CLI (--no-eval)
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    choices: Optional[tuple[str, ...]] = None
    max_length: Optional[int] = None
    required: bool = False  # the CLI and the REST body must give it
    rest: bool = True  # part of the REST job body
    cli: bool = True  # an `erq quantize` option


def _field(default: Any = dataclasses.MISSING, **option: Any) -> Any:
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default: configs are frozen")
    return dataclasses.field(default=default, metadata={"option": Option(**option)})


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize: the method, its bits and knobs, the calibration draw. erq_core.quantize()
    takes one; a job spec (ErqConfig) is a recipe with what to run it on and what to produce."""

    w_bits: int = _field(4, help="weight bits", flags=("--w-bits", "--w_bits", "--w_bit", "--w-bit"),
                         ge=MIN_BITS, le=MAX_BITS)
    a_bits: int = _field(4, help="activation bits", flags=("--a-bits", "--a_bits", "--a_bit", "--a-bit"),
                         ge=MIN_BITS, le=MAX_BITS)
    act_granularity: str = _field(
        "tensor", help="activation ranges: tensor (static per-tensor ranges calibrated once, as in the paper) or "
                       "token (each token's own range read at run time, as deployable runtimes do: linear inputs, "
                       "q and k per token, v per channel; see docs/algorithm.md); every method takes either",
        flags=("--act-granularity",), choices=ACT_GRANULARITIES)
    coe: float = _field(10000.0, help="the ridge lambda knob: Aqer uses 0.1*coe (0.1 for the head), Wqer 0.1*coe",
                        flags=("--coe",), gt=0, le=MAX_COE)
    calib_size: Optional[int] = _field(
        None, help="calibration images drawn (seeded) from train/ (default: 32 for erq, repq and rtn as in the "
                   "paper, 192 for erq+)",
        flags=("--calib-size", "--calib-batchsize", "--calib_batchsize", "--calib_size"), ge=1, le=MAX_CALIB_SIZE)
    method: str = _field("erq", help="erq (the paper), erq+ (our most accurate: see docs/algorithm.md), repq "
                                     "(RepQ-ViT alone) or rtn (round-to-nearest with the same quantizers)",
                         flags=("--method",), choices=METHODS)
    aqer: bool = _field(True, help="ERQ's Aqer step (off: an ablation)", negative_flag="--no-aqer")
    wqer: bool = _field(True, help="ERQ's Wqer step (off: an ablation)", negative_flag="--no-wqer")
    seed: int = _field(0, help="calibration seed", flags=("--seed",), ge=0, le=MAX_SEED)
    reconstruct: bool = _field(False, help="erq+ only: then learn each block's weight rounding and activation "
                                           "scales by block output reconstruction (meant for GPUs)",
                               flags=("--reconstruct",))
    reconstruct_iters: int = _field(RECONSTRUCT_ITERS, help="optimisation steps per block of --reconstruct",
                                    flags=("--reconstruct-iters",), ge=1, le=100_000)
    reconstruct_images: int = _field(RECONSTRUCT_IMAGES, help="calibration images --reconstruct learns from "
                                                               "(drawn like the others; more than calib-size "
                                                               "draws more)",
                                     flags=("--reconstruct-images",), ge=1, le=MAX_CALIB_SIZE)
    rotate: bool = _field(False, help="first rotate the FP model by orthogonal matrices that leave its output "
                                      "unchanged (residual stream, per-head values, a Hadamard before fc2) so "
                                      "that outliers spread over channels; ViT/DeiT only (see docs/algorithm.md)",
                          flags=("--rotate",))
    max_drop: Optional[float] = _field(
        None, help="accuracy budget, in points of top-1: put the most sensitive layers at 8 bits (weights and their "
                   "input activations), as few as bring the model within this many points of FP, with a margin of "
                   "one standard error, on held-out train/ images (not the calibration draw, never val/); see "
                   "docs/accuracy.md",
        flags=("--max-drop",), ge=0, le=100)

    def __post_init__(self) -> None:
        if self.calib_size is None and self.method in DEFAULT_CALIB_SIZE:
            object.__setattr__(self, "calib_size", DEFAULT_CALIB_SIZE[self.method])

    def validate_recipe(self) -> None:
        for spec in fields(QuantRecipe):
            check_value(spec, getattr(self, spec.name))
        if self.reconstruct and not self.method_spec.reconstructs:
            raise ConfigError(f"reconstruct starts from the erq+ solution: use method erq+ (got {self.method!r})")
        if self.reconstruct and self.act_granularity == "token":
            raise ConfigError("reconstruct learns static activation scales, which act_granularity token does not "
                              "have: use act_granularity tensor with reconstruct")

    @property
    def method_spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def images_needed(self) -> int:
        """Calibration images to draw: the statistics' and, with reconstruct, reconstruction's."""
        return max(self.calib_size, self.reconstruct_images if self.reconstruct else 0)

    @property
    def recipe(self) -> "QuantRecipe":
        """This recipe alone (a job spec's quantization part)."""
        return QuantRecipe(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QuantRecipe)})

    def to_dict(self) -> dict[str, Any]:
        return {spec.name: _jsonable(getattr(self, spec.name)) for spec in fields(type(self))}


@dataclass(frozen=True, kw_only=True)
class ErqConfig(QuantRecipe):
    """A job spec: a quantization recipe (QuantRecipe) and what to run it on (model, dataset,
    checkpoint) and produce (evaluation, exports). Saved verbatim beside every quantized model; the
    CLI options and the REST body are generated from its fields (`fields()`)."""

    model: str = _field(
        help="an alias (deit_small, vit_base, swin_tiny, ...), a timm ViT/DeiT/Swin name, hf-hub:ORG/NAME "
             "or local-dir:/path (timm's folder: config.json + model.safetensors)",
        flags=("--model",), max_length=1000, required=True)
    dataset: Optional[str] = _field(
        None, help="ImageFolder root: ROOT/train/<class>/* (calibration) and ROOT/val/<class>/* (evaluation)",
        flags=("--dataset",), max_length=4096, required=True)
    checkpoint: Optional[str] = _field(None, help="a local .safetensors state dict instead of downloading "
                                                  "(pickled checkpoints are refused)",
                                       flags=("--checkpoint",), max_length=4096)
    random_init: bool = _field(False, help="build the architecture without weights (benchmarks, smoke tests)",
                               flags=("--random-init",), rest=False)
    evaluate: bool = _field(True, help="evaluate FP and quantized top-1/top-5 on ROOT/val",
                            negative_flag="--no-eval")
    val_limit: Optional[int] = _field(None, help="evaluate on a fixed random subset of N val images",
                                      flags=("--val-limit", "--val_limit"), ge=1, le=MAX_VAL_LIMIT)
    batch_size: int = _field(32, help="batch size", flags=("--batch-size", "--batch_size"), ge=1, le=MAX_BATCH_SIZE)
    export: tuple[str, ...] = _field((), help="also write the model in these formats (onnx: DIR/model.onnx, "
                                              "runs in onnxruntime without erq; onnx-float64: "
                                              "DIR/model-float64.onnx, computed in float64 as erq evaluate "
                                              "--precision float64 does, also evaluated so; onnx-int8: "
                                              "DIR/model-int8.onnx on integer kernels, for 8-bit activations; "
                                              "onnx-w4: DIR/model-w4.onnx, 4-bit weight kernels with float "
                                              "activations, for weights of 4 bits or fewer); every ONNX file is "
                                              "also scored with onnxruntime; repeat the flag for several",
                                     flags=("--export",), choices=EXPORT_FORMATS)
    int8_weights: str = _field(DEFAULT_INT8_WEIGHTS,
                               help="onnx-int8's 8-bit weights: signed (INT8 for onnxruntime's u8s8 kernel: exact "
                                    "with VNNI and on ARM, and on x86 CPUs without VNNI when the session sets "
                                    "session.x64quantprecision=1, as erq's own scores do) or exact (UINT8 wherever "
                                    "u8s8 could saturate: exact on every CPU with no entry, about half as fast)",
                               flags=("--int8-weights",), choices=INT8_WEIGHTS)

    def validate(self) -> "ErqConfig":
        """Raise ConfigError with a message that says what to fix; return self when fine."""
        for spec in fields():
            check_value(spec, getattr(self, spec.name))
        validate_model_spec(self.model)
        if not self.dataset:
            raise ConfigError("dataset is required: an ImageFolder root with train/ and val/ folders")
        self.validate_recipe()
        self._check_export()
        return self

    def _check_export(self) -> None:
        """Refuse an export format that cannot express this run (erq_core.onnx_integer says why)."""
        if "onnx-int8" in self.export:
            if self.a_bits != 8:
                raise ConfigError(f"export onnx-int8 runs integer kernels on 8-bit activations: it needs a_bits 8, "
                                  f"got {self.a_bits} (onnx-w4 runs 4-bit weights with activations below 8 bits "
                                  "in float)")
            if self.act_granularity == "token":
                raise ConfigError("export onnx-int8 runs integer kernels on static per-tensor activation ranges; "
                                  "act_granularity token computes them per token at run time: export onnx, "
                                  "onnx-float64 or onnx-w4, or quantize with act_granularity tensor")
            if self.method not in INTEGER_ZERO_POINT_METHODS:
                raise ConfigError(f"export onnx-int8 needs integer activation zero points, which method "
                                  f"{self.method!r} does not keep (the RepQ-ViT fold makes them fractional): use "
                                  "method erq+ (--method erq+)")
        if "onnx-w4" in self.export and self.w_bits > 4:
            raise ConfigError(f"export onnx-w4 holds 4-bit weights: it needs w_bits 4 or fewer, got {self.w_bits} "
                              "(onnx-int8 takes weights of up to 8 bits)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ErqConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration fields: {', '.join(unknown)}")
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in data.items()})


@dataclass(frozen=True)
class FieldSpec:
    """One ErqConfig field as the CLI and REST generators see it."""

    name: str
    type: Any  # the annotation, e.g. int, Optional[int], tuple[str, ...]
    default: Any  # dataclasses.MISSING when the field has none
    option: Option

    @property
    def base_type(self) -> type:
        """int for Optional[int], str for tuple[str, ...]."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        return args[0] if typing.get_origin(self.type) in (typing.Union, types.UnionType, tuple) else self.type

    @property
    def is_sequence(self) -> bool:
        return typing.get_origin(self.type) is tuple

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)


# What users see first (CLI help, REST schema, config.json); then the recipe's fields, then the job's.
LEADING_FIELDS = ("model", "dataset")


def fields(of: Optional[type] = None) -> list[FieldSpec]:
    """The fields of a job spec (ErqConfig, the default) or of a recipe alone, LEADING_FIELDS first."""
    of = of or ErqConfig
    hints = typing.get_type_hints(of)
    ordered = sorted(dataclasses.fields(of), key=lambda f: f.name not in LEADING_FIELDS)  # a stable sort
    return [FieldSpec(f.name, hints[f.name], f.default, f.metadata["option"]) for f in ordered]


def describe_bounds(spec: FieldSpec) -> str:
    """'an integer from 2 to 8', 'a number greater than 0 and at most 1e+12', ..."""
    kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[spec.base_type]
    option = spec.option
    if option.ge is not None and option.le is not None:
        return f"{kind} from {_num(option.ge)} to {_num(option.le)}"
    parts = []
    if option.gt is not None:
        parts.append(f"greater than {_num(option.gt)}")
    if option.ge is not None:
        parts.append(f"at least {_num(option.ge)}")
    if option.le is not None:
        parts.append(f"at most {_num(option.le)}")
    return kind + (" " + " and ".join(parts) if parts else "")


def check_value(spec: FieldSpec, value: Any) -> None:
    """Raise ConfigError unless `value` fits the field's type, choices and bounds."""
    option = spec.option
    if value is None:
        if spec.optional:
            return
        raise ConfigError(f"{spec.name} is required")
    if spec.is_sequence:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{spec.name} must be a list, got {value!r}")
        for item in value:
            if option.choices is not None and item not in option.choices:
                raise ConfigError(f"{spec.name} entries must be among {', '.join(option.choices)}, got {item!r}")
        return
    if option.choices is not None:
        if value not in option.choices:
            raise ConfigError(f"{spec.name} must be one of {', '.join(option.choices)}, got {value!r}")
        return
    if not _has_type(value, spec.base_type) or not _in_bounds(value, option):
        raise ConfigError(f"{spec.name} must be {describe_bounds(spec)}, got {value!r}")
    if option.max_length is not None and len(value) > option.max_length:
        raise ConfigError(f"{spec.name} must be at most {option.max_length} characters long")


def _has_type(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _in_bounds(value: Any, option: Option) -> bool:
    if isinstance(value, (str, bool)):
        return True
    if value != value:  # NaN
        return False
    return ((option.ge is None or value >= option.ge) and (option.gt is None or value > option.gt)
            and (option.le is None or value <= option.le))


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e10 else f"{value:g}"


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
