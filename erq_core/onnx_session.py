"""How erq opens an ONNX file in onnxruntime: full graph optimisation, and exact integer products.

onnx-int8 files hold 8-bit weights as INT8 (erq_core.onnx_integer), which onnxruntime multiplies by
the UINT8 activations on its u8s8 kernel. On x86 CPUs with VNNI (AVX512-VNNI, AVX-VNNI) and on ARM
that kernel sums in 32 bits, exactly. On x86 CPUs without VNNI it sums each pair of neighbouring
products with vpmaddubsw into a saturating 16-bit integer, which 8-bit weights overflow. There the
session entry `session.x64quantprecision=1` makes onnxruntime rewrite every INT8 weight that could
overflow as UINT8 (w + 128, its zero point with it: the same products) at load, for its exact u8u8
kernel. erq sets it exactly where it is needed: on a VNNI CPU it would only slow the products down.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

EXACT_INT8_ENTRY = "session.x64quantprecision"  # onnxruntime's kOrtSessionOptionsAvx2PrecisionMode
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


def u8s8_saturates(machine: str, flags: Optional[frozenset[str]]) -> bool:
    """Whether onnxruntime's u8s8 kernel can saturate on a CPU (platform.machine(), its feature
    flags): x86 without VNNI. `flags` None (unknown: not Linux) counts as without VNNI, the exact
    choice, at the u8u8 kernel's speed."""
    if machine.lower() not in X86_MACHINES:
        return False
    return flags is None or not (flags & VNNI_FLAGS)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[frozenset[str]]:
    """The CPU's feature flags as Linux lists them, or None where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def needs_exact_int8_entry() -> bool:
    """Whether sessions on this machine need `session.x64quantprecision=1` for exact int8 products."""
    return u8s8_saturates(platform.machine(), cpu_flags())


def session_options(threads: Optional[int] = None, exact_int8: Optional[bool] = None):
    """onnxruntime SessionOptions: full graph optimisation, `threads` intra-op threads if given, and
    the exact-int8 entry where this CPU needs it (`exact_int8` True or False overrides that)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if needs_exact_int8_entry() if exact_int8 is None else exact_int8:
        options.add_session_config_entry(EXACT_INT8_ENTRY, "1")
    return options
