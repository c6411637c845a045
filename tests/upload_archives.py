"""Archives for upload tests and benchmarks: the fixture dataset and model zipped or tarred as a user
would, and hostile ones made member by member."""
from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path


def zip_folder(folder: Path, out: Path, inside: str = "") -> Path:
    """`zip -r`: every file of `folder`, under `inside/` when given."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{inside}/{path.relative_to(folder)}" if inside else str(path.relative_to(folder)))
    return out


def tar_folder(folder: Path, out: Path, inside: str = "", gzip: bool = True) -> Path:
    with tarfile.open(out, "w:gz" if gzip else "w") as archive:
        archive.add(folder, arcname=inside or ".", recursive=True)
    return out


def png(width: int = 8, height: int = 8, value: int = 128) -> bytes:
    """A real grey PNG (PIL)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height), value).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data: a pixel bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def zip_of(members: dict[str, bytes], out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out


def small_dataset(classes: int = 2, per_class: int = 3, val: bool = True) -> dict[str, bytes]:
    members = {}
    for split in ("train", "val") if val else ("train",):
        for c in range(classes):
            for i in range(per_class):
                members[f"{split}/class{c}/{i}.png"] = png(value=40 * c + i)
    return members


def zip_bomb(out: Path, unpacked_bytes: int, name: str = "train/zeros/bomb.png") -> Path:
    """A valid zip of one member of `unpacked_bytes` zeros (a multiple of 1 MiB, under 4 GiB), about
    a thousandth of that on disk. Made without compressing it all: one fully flushed deflate block
    of 1 MiB of zeros, repeated."""
    block = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = unpacked_bytes // len(block)
    data = repeated * count + zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    encoded = name.encode()
    fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x21, crc, len(data), count * len(block))
    local = struct.pack("<I", 0x04034B50) + fields + struct.pack("<HH", len(encoded), 0) + encoded
    central = (struct.pack("<IH", 0x02014B50, 20) + fields
               + struct.pack("<HHHHHII", len(encoded), 0, 0, 0, 0, 0o100644 << 16, 0) + encoded)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    out.write_bytes(local + data + central + end)
    return out


def many_files_tar_gz(out: Path, count: int) -> Path:
    """A tar.gz of `count` one-byte images-to-be (train/cN/NNNNNN.png), its headers patched from one
    template: quick even for 100,000 members."""
    import gzip

    template = bytearray(tarfile.TarInfo("train/c0/000000.png").tobuf(format=tarfile.USTAR_FORMAT))
    template[124:136] = b"%011o\0" % 1  # size 1
    template[148:156] = b" " * 8
    with gzip.open(out, "wb", compresslevel=1) as handle:
        for i in range(count):
            header = bytearray(template)
            header[0:19] = f"train/c{i % 10}/{i:06d}.png".encode()
            header[148:156] = b"%06o\0 " % sum(header)
            handle.write(bytes(header) + b"x" + bytes(511))
        handle.write(bytes(1024))
    return out
