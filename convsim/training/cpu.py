"""Training on a CPU: does this processor compute in bfloat16 natively, and so which precision a CPU run uses.

bf16 pays on a CPU only where its matmuls run natively in bf16 (x86 AVX512-BF16 or AMX, Arm's BF16
extension); elsewhere PyTorch converts to float32 and back around every matmul, which is slower than
float32 throughout (measured: docs/PERFORMANCE.md, "Where a CPU training step goes"). So a CPU run trains
in float32 unless the processor has native bf16, and `--frozen-dtype` forces either.

    native_bf16(Path("/proc/cpuinfo").read_text())      # the pure check, on any cpuinfo text
    cpu_has_native_bf16()                               # this machine
    cpu_precision_line("float32", native=False, forced=False)  # "CPU: fp32 (no native bf16) ..."
"""

from __future__ import annotations

import sys
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 `flags`; Arm's `Features` line says `bf16`
ARM_BF16_FEATURE = "bf16"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags a Linux /proc/cpuinfo text lists (x86 `flags`, Arm `Features`), over all processors."""
    out: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            out.update(value.split())
    return out


def native_bf16(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text describes a processor with native bf16 matmuls."""
    flags = cpu_flags(cpuinfo)
    return any(f in flags for f in NATIVE_BF16_FLAGS) or ARM_BF16_FEATURE in flags


def cpu_has_native_bf16(cpuinfo_path: str | Path = "/proc/cpuinfo") -> bool:
    """This machine's answer: from /proc/cpuinfo on Linux; False where there is none to read (the safe
    answer: float32 is never the slow choice). torch's `get_cpu_capability()` names the vector width
    (AVX2, AVX512), which does not say whether bf16 is native, so it is not used."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return native_bf16(Path(cpuinfo_path).read_text(errors="replace"))
    except OSError:
        return False


def cpu_dtype(asked: str | None, native: bool) -> str:
    """The dtype of a CPU run's frozen weights and autocast: as asked, else bfloat16 only with native bf16."""
    if asked:
        return asked
    return "bfloat16" if native else "float32"


def cpu_precision_line(dtype: str, native: bool, forced: bool) -> str:
    """The line `convsim train` prints on a CPU: the precision chosen and why."""
    short = "bf16" if dtype == "bfloat16" else "fp32"
    why = "native bf16" if native else "no native bf16"
    if forced:
        return f"CPU: {short} (forced by --frozen-dtype {dtype}; this CPU has {why})"
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    return f"CPU: {short} ({why}; --frozen-dtype {other} forces the other)"
