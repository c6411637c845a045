"""Uploaded archives (zip, tar, tar.gz) of an ImageFolder dataset or a timm model folder: every member
is checked before anything is kept, and a worker extracts an upload with the same code.

Light on purpose (no torch, no timm): the API checks uploads with it. Pillow decodes the images; a
model's weights are checked by reading the safetensors header with json (never unpickled, never
loaded into torch here: the API process does not import it); the worker loads them into the
architecture when a job starts.

What is refused, with a message that names the member and what to fix:
- member names that could escape (absolute, `..`, backslashes, NUL), links, device files, fifos,
  encrypted members, a name that appears twice;
- more members than ERQ_UPLOAD_MAX_FILES, more unpacked bytes than ERQ_UPLOAD_MAX_UNPACKED_BYTES
  (declared sizes are checked before anything is read, and the bytes actually read are counted:
  a decompression bomb stops at the limit), an image of more pixels than ERQ_UPLOAD_MAX_IMAGE_PIXELS;
- a truncated or corrupt archive, an image that does not decode, a file that is not where an
  ImageFolder (train/CLASS/IMAGE, val/CLASS/IMAGE) or a timm folder (config.json,
  model.safetensors) puts it, pickled weights.
Names starting with a dot and macOS' __MACOSX/ folder are skipped (never extracted). Everything may
sit in one top-level folder (`zip -r fmnist16.zip fmnist16/`).
"""
from __future__ import annotations

import json
import stat
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator, Optional

if TYPE_CHECKING:
    from storage.settings import Settings

# The engine's list (erq_core.data.IMAGE_EXTENSIONS, which imports torch); tests check they agree.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
MODEL_FILES = ("config.json", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own bound
SPOOL_BYTES = 8 << 20  # an image larger than this is checked from a temporary file, not from memory
COPY_BLOCK = 1 << 20
# bytes per element of each safetensors dtype
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FORMATS = ("zip", "tar", "tar.gz")
# What reading a broken archive raises.
CORRUPT = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, NotImplementedError, struct.error)


class ArchiveRefused(Exception):
    """The archive cannot be accepted. `status` is 413 for a limit (the message names the setting),
    else 422; `code` is stable (docs/api.md, "Error codes")."""

    def __init__(self, message: str, code: str = "invalid_archive", status: int = 422):
        super().__init__(message)
        self.code, self.status = code, status


@dataclass(frozen=True)
class Limits:
    max_unpacked_bytes: int
    max_files: int
    max_image_pixels: int

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Limits":
        return cls(settings.upload_max_unpacked_bytes, settings.upload_max_files, settings.upload_max_image_pixels)


def sniff_format(path: Path) -> str:
    """zip, tar.gz or tar, from the file's first bytes (never from its name or content type)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    if not head:
        raise ArchiveRefused("the upload is empty: send a .zip, .tar or .tar.gz archive")
    raise ArchiveRefused("the upload is not a zip, tar or tar.gz archive (other compressions are not supported: "
                         "make it with `zip -r` or `tar czf`)")


@dataclass
class DatasetSummary:
    classes: list[str]
    train_images: int
    val_images: int
    unpacked_size: int


@dataclass
class _Walk:
    """What a walk over an archive's members has seen so far."""

    limits: Limits
    members: int = 0
    unpacked: int = 0
    root: Optional[str] = None  # the one top-level folder everything sits in ('' when none)
    names: set[str] = field(default_factory=set)

    def count(self, size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_files:
            raise ArchiveRefused(f"the archive has more than {self.limits.max_files} members "
                                 "(ERQ_UPLOAD_MAX_FILES); split it or ask the operator to raise the limit",
                                 "archive_too_many_files", 413)
        self.add_bytes(size)

    def add_bytes(self, size: int) -> None:
        self.unpacked += size
        if self.unpacked > self.limits.max_unpacked_bytes:
            raise ArchiveRefused(f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes "
                                 "(ERQ_UPLOAD_MAX_UNPACKED_BYTES)", "archive_too_large_unpacked", 413)


def _entries(path: Path, fmt: str) -> Iterator[tuple[str, str, int, Callable[[], IO[bytes]]]]:
    """(raw name, type: file/dir/link/special, declared size, opener) of each member, in order."""
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                yield from _zip_entries(archive, infos)
        else:
            with tarfile.open(path, "r:gz" if fmt == "tar.gz" else "r:") as archive:
                for member in archive:
                    kind = ("file" if member.isreg() else "dir" if member.isdir() else
                            "link" if member.issym() or member.islnk() else "special")
                    yield member.name, kind, member.size, lambda m=member: archive.extractfile(m)
    except CORRUPT as exc:
        raise ArchiveRefused(f"the {fmt} archive is truncated or corrupt ({exc}); make it again and re-send it",
                             "archive_corrupt") from None


def _zip_entries(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]):
    for info in infos:
        if info.flag_bits & 0x1:
            raise ArchiveRefused(f"{info.filename!r} is encrypted: send an archive without a password")
        mode = info.external_attr >> 16
        kind = "dir" if info.is_dir() else "file"
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = "link" if stat.S_ISLNK(mode) else "special"
        yield info.filename, kind, info.file_size, lambda i=info: archive.open(i)


def _safe_name(raw: str) -> str:
    """The member's path relative to the archive's root, or ArchiveRefused if it could escape."""
    if "\x00" in raw:
        raise ArchiveRefused(f"member name {raw!r} contains a NUL byte", "unsafe_member")
    if "\\" in raw:
        raise ArchiveRefused(f"member name {raw!r} uses backslashes: make the archive with forward slashes "
                             "(zip -r, tar czf)", "unsafe_member")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise ArchiveRefused(f"member {raw!r} has an absolute path: archive paths must be relative", "unsafe_member")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveRefused(f"member {raw!r} climbs out of the archive ('..'): refused", "unsafe_member")
    return "/".join(parts)


def _skipped(name: str) -> bool:
    parts = name.split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _walk(path: Path, fmt: str, limits: Limits, top_markers: tuple[str, ...]) -> Iterator[tuple[str, IO[bytes]]]:
    """(name under the archive's root, open stream) of each regular file to look at, after the
    checks every member gets. `top_markers`: first parts that mean the archive has no wrapper folder."""
    walk = _Walk(limits)
    for raw, kind, size, opener in _entries(path, fmt):
        walk.count(size)
        if kind == "link":
            raise ArchiveRefused(f"member {raw!r} is a link: links are refused, put the file itself in the archive",
                                 "unsafe_member")
        if kind == "special":
            raise ArchiveRefused(f"member {raw!r} is a device file or fifo: refused", "unsafe_member")
        name = _safe_name(raw)
        if kind == "dir" or not name or _skipped(name):
            continue
        if walk.root is None:
            first = name.split("/", 1)[0]
            walk.root = "" if "/" not in name or first in top_markers else first + "/"
        if not name.startswith(walk.root):
            raise ArchiveRefused(f"member {name!r} is outside the folder {walk.root.rstrip('/')!r} that holds "
                                 "the rest: put everything in one folder, or nothing in a folder")
        name = name[len(walk.root):]
        if name in walk.names:
            raise ArchiveRefused(f"member {name!r} appears twice in the archive")
        walk.names.add(name)
        try:
            stream = opener()
        except CORRUPT as exc:
            raise ArchiveRefused(f"the archive is truncated or corrupt at member {name!r} ({exc}); make it again "
                                 "and re-send it", "archive_corrupt") from None
        with stream:
            yield name, _Counted(stream, walk, size, name)


class _Counted:
    """A member's stream that counts the bytes actually read against the limits, and refuses more
    than the member declared (a lying header of a decompression bomb)."""

    def __init__(self, stream: IO[bytes], walk: _Walk, declared: int, name: str):
        self.stream, self.walk, self.declared, self.name, self.read_so_far = stream, walk, declared, name, 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.stream.read(COPY_BLOCK if size is None or size < 0 else size)
        except CORRUPT as exc:
            raise ArchiveRefused(f"the archive is truncated or corrupt at member {self.name!r} ({exc}); make it "
                                 "again and re-send it", "archive_corrupt") from None
        self.read_so_far += len(data)
        if self.read_so_far > self.declared:
            raise ArchiveRefused(f"member {self.name!r} holds more than the {self.declared} bytes its header "
                                 "declares: refused", "archive_corrupt")
        return data

    def copy_to(self, out: IO[bytes]) -> int:
        while block := self.read(COPY_BLOCK):
            out.write(block)
        return self.read_so_far


def check_dataset(path: Path, limits: Limits, extract_to: Optional[Path] = None) -> DatasetSummary:
    """Check an ImageFolder archive, or, with `extract_to`, extract it there. Two passes: the first
    checks every member's name, type and size (cheap: a zip's directory, a tar's headers), the second
    decodes every image, or extracts. Raises ArchiveRefused."""
    fmt = sniff_format(path)
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for name, _ in _walk(path, fmt, limits, SPLITS):
        parts = name.split("/")
        if len(parts) != 3 or parts[0] not in SPLITS:
            raise ArchiveRefused(f"member {name!r} is not where an ImageFolder puts images: expected "
                                 "train/CLASS/IMAGE (and val/CLASS/IMAGE), optionally inside one folder")
        if not parts[2].lower().endswith(IMAGE_EXTENSIONS):
            raise ArchiveRefused(f"member {name!r} is not an image file (allowed: {', '.join(IMAGE_EXTENSIONS)})",
                                 "invalid_image")
        counts[parts[0]][parts[1]] = counts[parts[0]].get(parts[1], 0) + 1
    if not counts["train"]:
        raise ArchiveRefused("the archive has no train/CLASS/IMAGE files: a dataset is an ImageFolder with "
                             "train/ (calibration) and optionally val/ (evaluation)", "invalid_dataset")
    if counts["val"] and set(counts["val"]) != set(counts["train"]):
        only_train = sorted(set(counts["train"]) - set(counts["val"]))[:5]
        only_val = sorted(set(counts["val"]) - set(counts["train"]))[:5]
        raise ArchiveRefused(f"train/ and val/ have different classes (only in train: {only_train}, only in val: "
                             f"{only_val}): the class folders name the labels and must match", "invalid_dataset")
    unpacked = 0
    for name, stream in _walk(path, fmt, limits, SPLITS):
        if extract_to is None:
            unpacked += _check_image(name, stream, limits)
        else:
            target = extract_to / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:
                unpacked += stream.copy_to(out)
    return DatasetSummary(classes=sorted(counts["train"]), train_images=sum(counts["train"].values()),
                          val_images=sum(counts["val"].values()), unpacked_size=unpacked)


def _check_image(name: str, stream: "_Counted", limits: Limits) -> int:
    """Decode one image (from memory, or a temporary file past SPOOL_BYTES); returns its size in bytes."""
    from PIL import Image, UnidentifiedImageError

    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as copy:
        size = stream.copy_to(copy)
        copy.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(copy) as image:
                    width, height = image.size
                    if width * height > limits.max_image_pixels:
                        raise _too_many_pixels(name, width, height, limits)
                    image.load()
        except Image.DecompressionBombError:
            raise _too_many_pixels(name, 0, 0, limits) from None
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError) as exc:
            raise ArchiveRefused(f"member {name!r} is not a readable image ({exc})", "invalid_image") from None
    return size


def _too_many_pixels(name: str, width: int, height: int, limits: Limits) -> ArchiveRefused:
    shown = f" ({width}x{height})" if width else ""
    return ArchiveRefused(f"image {name!r}{shown} has more than {limits.max_image_pixels} pixels "
                          "(ERQ_UPLOAD_MAX_IMAGE_PIXELS): resize it", "image_too_large", 413)


@dataclass
class ModelSummary:
    architecture: str
    num_classes: Optional[int]
    parameters: int
    unpacked_size: int


def extract_model(path: Path, limits: Limits, folder: Path) -> None:
    """Extract config.json and model.safetensors of a timm folder archive into `folder` (other files
    are skipped; pickled weights are refused). Raises ArchiveRefused."""
    fmt = sniff_format(path)
    for name, stream in _walk(path, fmt, limits, MODEL_FILES):
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise ArchiveRefused(f"member {name!r} is a pickle: pickled weights are refused, send "
                                 "model.safetensors (safetensors.torch.save_file(state_dict, 'model.safetensors'))",
                                 "pickle_refused")
        if name in MODEL_FILES:
            with open(folder / name, "xb") as out:
                stream.copy_to(out)
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ArchiveRefused(f"the model archive has no {' and no '.join(missing)}: a timm folder holds "
                             "config.json and model.safetensors", "invalid_model")


def check_model(folder: Path, supported: Callable[[str], bool]) -> ModelSummary:
    """Check a timm folder's config.json and model.safetensors without torch: the architecture is one
    `supported` accepts, the safetensors header is well formed and every tensor lies in the file, and
    the classifier's width is the config's num_classes. Raises ArchiveRefused."""
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise ArchiveRefused(f"config.json is over {MAX_CONFIG_BYTES} bytes: not a timm model config", "invalid_model")
    try:
        config = json.loads(config_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveRefused(f"config.json is not JSON ({exc})", "invalid_model") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ArchiveRefused("config.json has no \"architecture\": expected timm's config.json (as "
                             "timm's push_to_hf_hub / save_for_hf writes it)", "invalid_model")
    architecture = config["architecture"]
    if not supported(architecture):
        raise ArchiveRefused(f"architecture {architecture!r} is not one erq quantizes (timm ViT, DeiT and Swin: "
                             "GET /v1/models lists them)", "unsupported_architecture")
    model_args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    num_classes = next((value for value in (config.get("num_classes"), model_args.get("num_classes"),
                                            pretrained.get("num_classes")) if isinstance(value, int)), None)
    tensors = read_safetensors_header(weights)
    head = tensors.get("head.weight") or tensors.get("head.fc.weight")
    if num_classes is not None and head is not None and head["shape"][:1] != [num_classes]:
        raise ArchiveRefused(f"the weights' classifier has {head['shape'][0]} outputs but config.json says "
                             f"num_classes {num_classes}: the two files are not of one model", "invalid_model")
    parameters = sum(_elements(t["shape"]) for t in tensors.values())
    return ModelSummary(architecture=architecture, num_classes=num_classes, parameters=parameters,
                        unpacked_size=config_path.stat().st_size + weights.stat().st_size)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors of a safetensors file ({name: {dtype, shape, data_offsets}}), checked against the
    file: a known dtype, a shape whose size matches its byte range, ranges that tile the data exactly.
    Raises ArchiveRefused (a pickle is recognised and named)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if prefix[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or prefix[:4] == b"PK\x03\x04":
            raise ArchiveRefused("model.safetensors is a pickled (torch.save) checkpoint: pickles are refused, "
                                 "convert it with safetensors.torch.save_file", "pickle_refused")
        if len(prefix) < 8:
            raise ArchiveRefused("model.safetensors is truncated (no header)", "invalid_model")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
            raise ArchiveRefused("model.safetensors has an impossible header length: truncated or not safetensors",
                                 "invalid_model")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArchiveRefused(f"model.safetensors' header is not JSON ({exc})", "invalid_model") from None
    if not isinstance(header, dict):
        raise ArchiveRefused("model.safetensors' header is not a JSON object", "invalid_model")
    header.pop("__metadata__", None)
    data_size, end, tensors = size - 8 - length, 0, {}
    try:
        ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        for name, info in ordered:
            dtype, shape, (begin, stop) = info["dtype"], list(info["shape"]), info["data_offsets"]
            if dtype not in DTYPE_BYTES or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise ArchiveRefused(f"model.safetensors: tensor {name!r} has dtype {dtype!r} / shape {shape} that "
                                     "safetensors does not define", "invalid_model")
            if begin != end or stop - begin != _elements(shape) * DTYPE_BYTES[dtype]:
                raise ArchiveRefused(f"model.safetensors: tensor {name!r}'s bytes {begin}..{stop} do not fit its "
                                     f"shape {shape} {dtype} or overlap another", "invalid_model")
            end = stop
            tensors[name] = {"dtype": dtype, "shape": shape}
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveRefused(f"model.safetensors' header is malformed ({exc})", "invalid_model") from None
    if end != data_size:
        raise ArchiveRefused(f"model.safetensors holds {data_size} bytes of data where its header describes {end}: "
                             "truncated or padded", "invalid_model")
    if not tensors:
        raise ArchiveRefused("model.safetensors holds no tensors", "invalid_model")
    return tensors


def _elements(shape: list[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def pack_model(folder: Path, out: Path) -> None:
    """The stored form of a model: a tar of config.json and model.safetensors with fixed metadata,
    so that the same two files give the same bytes (and sha256) whatever archive they came in."""
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as archive:
        for name in MODEL_FILES:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = (folder / name).stat().st_size, 0o644, 0
            with open(folder / name, "rb") as handle:
                archive.addfile(info, handle)


def unpack(path: Path, kind: str, limits: Limits, folder: Path) -> None:
    """Extract a stored upload into the empty `folder` (a worker's cache entry), checked as above."""
    if kind == "dataset":
        check_dataset(path, limits, extract_to=folder)
    else:
        extract_model(path, limits, folder)
