"""The CPU-kernel pin (cpu_kernels.py): which variables it sets, when, and that torch obeys."""
import os
import subprocess
import sys
import warnings

import pytest

from rledit_plugin import cpu_kernels
from rledit_plugin.cpu_kernels import PINNED, cpu_has_avx2, pin_cpu_kernels, requested_kernels

VARIABLES = list(PINNED) + ["RLEDIT_CPU_KERNELS"]
needs_avx2 = pytest.mark.skipif(not cpu_has_avx2(), reason="needs an x86-64 CPU with AVX2")


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _pin_quietly():
    with warnings.catch_warnings():     # a CPU without AVX2 natively would warn: not this test's point
        warnings.simplefilter("ignore")
        return pin_cpu_kernels()


def test_pin_sets_every_variable_on_an_avx2_cpu(clean_env):
    clean_env.setattr(cpu_kernels, "cpu_has_avx2", lambda: True)
    _pin_quietly()
    assert {name: os.environ.get(name) for name in PINNED} == PINNED


def test_pin_keeps_what_the_caller_set(clean_env):
    clean_env.setattr(cpu_kernels, "cpu_has_avx2", lambda: True)
    clean_env.setenv("MKL_CBWR", "COMPATIBLE")
    _pin_quietly()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"


@pytest.mark.parametrize("native, has_avx2", [("native", True), (None, False)])
def test_no_pin_when_asked_for_native_kernels_or_without_avx2(clean_env, native, has_avx2):
    clean_env.setattr(cpu_kernels, "cpu_has_avx2", lambda: has_avx2)
    if native:
        clean_env.setenv("RLEDIT_CPU_KERNELS", native)
    _pin_quietly()
    assert not any(name in os.environ for name in PINNED)


def test_a_bad_choice_names_the_variable(clean_env, capsys):
    clean_env.setenv("RLEDIT_CPU_KERNELS", "avx512")
    with pytest.raises(ValueError, match=r"RLEDIT_CPU_KERNELS='avx512'.*avx2, native"):
        requested_kernels()
    from rledit_plugin.cli import main
    from rledit_plugin.compare_cli import main as compare_main
    assert main(["world", "--out", "unused"]) == 2
    assert "RLEDIT_CPU_KERNELS" in capsys.readouterr().err
    assert compare_main(["--turns", "1"]) == 2
    assert "RLEDIT_CPU_KERNELS" in capsys.readouterr().err


def test_avx2_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    with_avx2, without = tmp_path / "with", tmp_path / "without"
    with_avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nflags\t\t: fpu\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2_fake\n")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    assert cpu_has_avx2(str(with_avx2)) and not cpu_has_avx2(str(without))
    assert not cpu_has_avx2(str(tmp_path / "missing"))
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")
    assert not cpu_has_avx2(str(with_avx2))


def test_the_tiny_lm_cache_key_depends_on_the_kernels(world, monkeypatch):
    from rledit_plugin.world import tiny_lm
    cfg = tiny_lm.TinyLMConfig.for_arch("gpt2")
    keys = set()
    for kernels in ("AVX2", "AVX512"):
        monkeypatch.setattr(tiny_lm, "cpu_kernels", lambda k=kernels: k)
        keys.add(tiny_lm.cache_key(world, "gpt2", cfg))
    assert len(keys) == 2


# A computation through kernels that differ between AVX2 and AVX-512 on a Zen 4 (softmax:
# ATen's; GELU: oneDNN's), hashed; and the capability torch used.
_PROBE = """
import hashlib, sys, torch
{before}
torch.set_num_threads(1)
x = torch.randn(300, 3072, generator=torch.Generator().manual_seed(0))
h = hashlib.sha256()
for y in (torch.nn.functional.gelu(x), torch.softmax(x, -1),
          torch.nn.functional.layer_norm(x, (3072,)), x.sum(-1)):
    h.update(y.numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())
"""


def _probe(before: str = "", **env) -> list:
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", _PROBE.format(before=before)],
                         env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


@needs_avx2
def test_torch_uses_avx2_kernels_once_pinned():
    pin = "from rledit_plugin.cpu_kernels import pin_cpu_kernels; pin_cpu_kernels()"
    pinned = _probe(pin)
    by_hand = _probe(**PINNED)
    native = _probe()
    assert pinned[0] == "AVX2" and pinned == by_hand
    assert _probe(pin, RLEDIT_CPU_KERNELS="native") == native


@needs_avx2
def test_the_command_line_pins_before_its_first_operation(tmp_path):
    code = ("from rledit_plugin.cli import main; import torch; "
            f"main(['world', '--out', {str(tmp_path)!r}]); "
            "print(torch.backends.cpu.get_cpu_capability())")
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split()[-1] == "AVX2"


@needs_avx2
def test_a_pin_after_torch_chose_other_kernels_warns():
    native = _probe()[0]
    if native == "AVX2":
        pytest.skip("this CPU's own kernels are AVX2: a late pin changes nothing")
    late = "torch.ones(8).sum()\nfrom rledit_plugin.cpu_kernels import pin_cpu_kernels; pin_cpu_kernels()"
    with pytest.raises(subprocess.CalledProcessError) as err:
        _probe(late)
    assert "already chose" in err.value.stderr
