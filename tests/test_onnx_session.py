"""Where erq's onnxruntime sessions ask for exact int8 products: x86 CPUs without VNNI only."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest

from erq_core.onnx_session import EXACT_INT8_ENTRY, cpu_flags, needs_exact_int8_entry, session_options, u8s8_saturates

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("machine, flags, saturates", [
    ("x86_64", {"sse4_1", "avx2", "fma"}, True),  # e.g. AMD Zen 3, Intel Skylake client
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, True),  # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),  # Cascade Lake and later, Zen 4
    ("x86_64", {"avx2", "avx_vnni"}, False),  # Alder Lake
    ("AMD64", {"avx2"}, True),  # how Windows spells it
    ("x86_64", None, True),  # flags unknown: the exact choice
    ("aarch64", None, False),  # ARM's int8 dot products sum in 32 bits
    ("arm64", {"asimddp"}, False),
])
def test_only_x86_without_vnni_saturates(machine, flags, saturates):
    assert u8s8_saturates(machine, None if flags is None else frozenset(flags)) is saturates


def test_flags_are_read_from_a_linux_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512_vnni\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "sse2", "avx2", "avx512_vnni"})
    assert cpu_flags(tmp_path / "missing") is None
    (tmp_path / "empty").write_text("processor\t: 0\n")
    assert cpu_flags(tmp_path / "empty") is None


def entry(options) -> str | None:
    try:
        return options.get_session_config_entry(EXACT_INT8_ENTRY)
    except RuntimeError:  # onnxruntime: "does not have configuration with key"
        return None


def test_session_options_set_the_entry_where_this_machine_needs_it():
    expected = u8s8_saturates(platform.machine(), cpu_flags(Path("/proc/cpuinfo")))
    assert needs_exact_int8_entry() is expected
    assert entry(session_options(threads=2)) == ("1" if expected else None)
    assert entry(session_options(exact_int8=True)) == "1"
    assert entry(session_options(exact_int8=False)) is None
    assert session_options(threads=3).intra_op_num_threads == 3
