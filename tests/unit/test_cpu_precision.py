"""CPU precision: native bf16 detected from /proc/cpuinfo texts, and a CPU run in bf16 only where it is native
(or forced with --frozen-dtype), float32 otherwise, autocast following the frozen weights."""

from __future__ import annotations

import pytest

from convsim.config import TrainConfig
from convsim.training.cpu import cpu_dtype, cpu_flags, cpu_has_native_bf16, cpu_precision_line, native_bf16

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma f16c bmi2
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 fma f16c bmi2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
AMX_ONLY = "flags\t: avx2 avx512f amx_tile amx_bf16\n"
AVX512_NO_BF16 = "flags\t: avx2 avx512f avx512bw avx512vl avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha3 sve bf16 i8mm\nCPU implementer\t: 0x41\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


@pytest.mark.parametrize(
    "text, native",
    [
        (AVX2_ONLY, False),
        (SAPPHIRE_RAPIDS, True),
        (AMX_ONLY, True),
        (AVX512_NO_BF16, False),  # AVX512 alone converts bf16 in software
        (GRAVITON3, True),
        (GRAVITON2, False),
        ("", False),
        ("model name\t: flags avx512_bf16 in a name\n", False),  # only the flags lines count
    ],
)
def test_native_bf16_from_cpuinfo(text, native):
    assert native_bf16(text) is native


def test_flags_are_whole_words():
    assert "avx512_bf16" not in cpu_flags("flags\t: avx512_bf16x avx512bf16\n")
    assert cpu_flags(AVX2_ONLY) >= {"avx2", "fma"}


def test_machine_check_reads_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.platform", "linux")
    (tmp_path / "yes").write_text(SAPPHIRE_RAPIDS)
    (tmp_path / "no").write_text(AVX2_ONLY)
    assert cpu_has_native_bf16(tmp_path / "yes") is True
    assert cpu_has_native_bf16(tmp_path / "no") is False
    assert cpu_has_native_bf16(tmp_path / "missing") is False
    monkeypatch.setattr("sys.platform", "darwin")
    assert cpu_has_native_bf16(tmp_path / "yes") is False  # no /proc/cpuinfo to trust: float32


def test_fallback_decision():
    assert cpu_dtype(None, native=False) == "float32"
    assert cpu_dtype(None, native=True) == "bfloat16"
    assert cpu_dtype("bfloat16", native=False) == "bfloat16"  # forced
    assert cpu_dtype("float32", native=True) == "float32"


@pytest.mark.parametrize("native", [False, True])
def test_cpu_run_follows_the_processor_unless_forced(monkeypatch, native):
    from convsim.training.model import bf16_autocast, cpu_precision, frozen_dtype

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr("convsim.training.cpu.cpu_has_native_bf16", lambda: native)
    want = "bfloat16" if native else "float32"
    assert frozen_dtype(TrainConfig(), "cpu") == want
    assert bf16_autocast(TrainConfig(), "cpu") is native
    assert bf16_autocast(TrainConfig(frozen_dtype="bfloat16"), "cpu") is True
    assert bf16_autocast(TrainConfig(frozen_dtype="float32"), "cpu") is False
    assert bf16_autocast(TrainConfig(frozen_dtype="float32"), "cuda") is True  # CUDA: autocast as before
    line = cpu_precision(TrainConfig())
    assert line.startswith("CPU: bf16 (native bf16" if native else "CPU: fp32 (no native bf16")
    assert "forced" in cpu_precision(TrainConfig(frozen_dtype="float32"))


def test_precision_line_wording():
    assert cpu_precision_line("float32", native=False, forced=False).startswith("CPU: fp32 (no native bf16;")
    assert cpu_precision_line("bfloat16", native=False, forced=True) == (
        "CPU: bf16 (forced by --frozen-dtype bfloat16; this CPU has no native bf16)"
    )
