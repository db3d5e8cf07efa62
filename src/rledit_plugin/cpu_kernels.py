"""The same CPU kernels on every x86-64 machine, so one command gives one set of numbers.

PyTorch picks its vectorised CPU kernels (GELU, softmax, layer norm, reductions, AdamW, ...)
by the widest instruction set the CPU has: AVX-512 on a Zen 4, AVX2 on a Zen 3.  The two
round differently, and over the tiny LM's 12,000 pre-training steps the difference grows
into another model: on the Zen 4 VM the embedded default's tiny LM took 15 epochs and knew
98.6 / 98.4 / 99.0% of its facts, on a Zen 3 VM 16 epochs and 98.4 / 98.0 / 98.2%, and every
number measured on them differed (docs/TUNING.md section 15).  With torch's AVX2 kernels
requested, the Zen 4 VM pre-trained the Zen 3 VM's model (same epochs, same accuracies).

:func:`pin_cpu_kernels` asks for them before torch runs its first operation: the ``rledit``
command line and the test suite call it first thing.  MKL's and oneDNN's code paths are
pinned to AVX2 as well (on AMD CPUs MKL gave the same bits with and without; Intel CPUs were
not checked).  ``RLEDIT_CPU_KERNELS=native`` keeps the machine's own kernels; a value the
caller already set in ``ATEN_CPU_CAPABILITY``, ``MKL_CBWR`` or ``ONEDNN_MAX_CPU_ISA`` is kept.
A library user who imports rledit_plugin is never pinned: that is the caller's process.
"""
from __future__ import annotations

import contextlib
import os
import platform
import warnings

CHOICE_VARIABLE = "RLEDIT_CPU_KERNELS"
CHOICES = ("avx2", "native")
# read by torch (ATen's dispatch), MKL and oneDNN when each first runs
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_has_avx2(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this is an x86-64 CPU whose flags list AVX2 (Linux; elsewhere: False)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "avx2" in line.split(":", 1)[-1].split()
    except OSError:
        pass
    return False


def requested_kernels() -> str:
    """``$RLEDIT_CPU_KERNELS`` (default ``avx2``), checked."""
    choice = os.environ.get(CHOICE_VARIABLE, "avx2").strip().lower() or "avx2"
    if choice not in CHOICES:
        raise ValueError(f"environment variable {CHOICE_VARIABLE}={os.environ[CHOICE_VARIABLE]!r}: "
                         f"expected one of {', '.join(CHOICES)}")
    return choice


def pin_cpu_kernels() -> str:
    """Request AVX2 kernels from torch, MKL and oneDNN (unless ``RLEDIT_CPU_KERNELS=native``
    or the CPU lacks AVX2); returns the capability torch uses, e.g. ``"AVX2"``.

    Must run before torch's first CPU operation in the process: torch fixes its choice then.
    If it comes too late, a warning says so and nothing else changes.
    """
    pin = requested_kernels() == "avx2" and cpu_has_avx2()
    if pin:
        for name, value in PINNED.items():
            os.environ.setdefault(name, value)
    import torch
    capability = torch.backends.cpu.get_cpu_capability()
    if pin and os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and capability != "AVX2":
        warnings.warn(f"torch had already chosen its {capability} CPU kernels, so results can "
                      "differ from other CPUs' (call pin_cpu_kernels before any torch operation)",
                      stacklevel=2)
    return capability


def cpu_kernels() -> str:
    """The CPU kernels torch is using (``AVX2``, ``AVX512``, ``DEFAULT``, ...): part of the
    tiny LM's cache key, since models pre-trained with different ones differ."""
    import torch
    return torch.backends.cpu.get_cpu_capability()


@contextlib.contextmanager
def fixed_threads(n: int):
    """Run the block on exactly ``n`` torch intra-op threads, whatever the caller set
    (``n <= 0``: leave the caller's setting); the caller's count is restored after.

    The thread count can change float reductions, so work whose result is kept (the tiny
    LM's pre-training, the key statistics) runs on a fixed count that is part of its
    configuration, never one chosen by machine load.  Two threads pre-train the default tiny
    LM 1.5x faster per step than one on an idle 2-core machine (bench/bench_pretrain.py,
    docs/TUNING.md section 12) and measure its key statistics 1.6x faster (section 16); on
    cores shared with other busy processes, several threads per core can be far slower.
    """
    import torch
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
