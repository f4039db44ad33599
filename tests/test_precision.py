"""The compute dtype "auto" (kernels/precision.py): the rule with the CPU capability probes patched both ways, and
every place that takes "auto" (Linear4bit, load_model, TrainConfig, the CLI) following it."""

import platform

import pytest
import torch

from nf4lora.kernels import matmul_4bit
from nf4lora.kernels.precision import auto_compute_dtype, cpu_isa, resolve_compute_dtype
from nf4lora.lora import Linear4bit, linear4bit

PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_avx512_supported", "_is_avx2_supported")


@pytest.fixture
def cpu(monkeypatch):
    """cpu(isa, cap=None): make this process see a CPU whose best ISA is `isa` (AMX, AVX512-BF16, AVX-512 or
    AVX2) and, if given, the oneDNN cap ONEDNN_MAX_CPU_ISA=cap."""

    def fake(isa: str, cap: str | None = None):
        order = ("AMX", "AVX512-BF16", "AVX-512", "AVX2")
        have = order[order.index(isa) :]
        for probe, name in zip(PROBES, order):
            monkeypatch.setattr(torch.cpu, probe, lambda has=name in have: has)
        monkeypatch.setattr(platform, "machine", lambda: "x86_64")
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        auto_compute_dtype.cache_clear()

    yield fake
    auto_compute_dtype.cache_clear()


@pytest.mark.parametrize(
    "isa, cap, expected",
    [
        ("AVX2", None, torch.float32),
        ("AVX-512", None, torch.float32),  # AVX-512 without its BF16 extension: oneDNN emulates bf16
        ("AVX512-BF16", None, torch.bfloat16),
        ("AMX", None, torch.bfloat16),
        ("AVX512-BF16", "AVX2", torch.float32),  # oneDNN capped below the bf16 instructions
        ("AVX512-BF16", "avx512_core", torch.float32),
        ("AVX512-BF16", "AVX512_CORE_BF16", torch.bfloat16),
        ("AMX", "ALL", torch.bfloat16),
    ],
)
def test_auto_is_bf16_only_where_the_cpu_multiplies_it_natively(cpu, isa, cap, expected):
    cpu(isa, cap)
    chosen = auto_compute_dtype("cpu")
    assert chosen.dtype == expected
    assert isa in chosen.reason and (cap is None or cap in chosen.reason or expected == torch.bfloat16)
    assert str(chosen).startswith(str(expected).removeprefix("torch.") + " (")


def test_auto_takes_a_device_or_its_name(cpu):
    """A torch.device (as model.device gives it) or a device string means the same as its type: a device object
    once fell through to the float32 branch for devices other than the CPU."""
    cpu("AVX512-BF16")
    assert auto_compute_dtype(torch.device("cpu")) == auto_compute_dtype("cpu") == auto_compute_dtype()
    assert auto_compute_dtype(torch.device("cpu")).dtype == torch.bfloat16
    assert auto_compute_dtype("meta").dtype == auto_compute_dtype(torch.device("meta")).dtype == torch.float32


def test_the_isa_names_the_best_extension(cpu):
    for isa in ("AVX2", "AVX-512", "AVX512-BF16", "AMX"):
        cpu(isa)
        assert cpu_isa() == isa


def test_other_machines_and_devices_get_float32(cpu, monkeypatch):
    cpu("AMX")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    auto_compute_dtype.cache_clear()
    assert auto_compute_dtype("cpu").dtype == torch.float32 and "aarch64" in auto_compute_dtype("cpu").reason
    assert auto_compute_dtype("meta").dtype == torch.float32


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_is_bf16_where_native_else_fp16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a GPU")
    auto_compute_dtype.cache_clear()
    try:
        assert auto_compute_dtype("cuda", 0).dtype == expected
    finally:
        auto_compute_dtype.cache_clear()


def test_an_explicit_dtype_always_wins(cpu):
    cpu("AVX2")
    assert resolve_compute_dtype("bfloat16").dtype == torch.bfloat16
    assert resolve_compute_dtype(torch.float16).dtype == torch.float16
    assert resolve_compute_dtype("auto").dtype == torch.float32
    with pytest.raises(ValueError, match="compute dtype must be 'auto', 'bfloat16', 'float16', 'float32'.*got 'int8'"):
        resolve_compute_dtype("int8")


@pytest.mark.parametrize("isa, expected", [("AVX2", torch.float32), ("AVX512-BF16", torch.bfloat16)])
def test_linear4bit_auto_computes_in_the_devices_dtype(cpu, monkeypatch, isa, expected):
    cpu(isa)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    assert layer.compute_dtype == "auto"
    seen = []

    def spy(x, *args):
        seen.append(x.dtype)
        return matmul_4bit(x, *args)

    monkeypatch.setattr(linear4bit, "matmul_4bit", spy)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    assert seen == [expected] and y.dtype == torch.float32  # computed in the device's dtype, returned in x's
    # None keeps the input's dtype, an explicit dtype wins
    assert Linear4bit.from_linear(torch.nn.Linear(64, 32), compute_dtype=None).dtypes_for(x) == (torch.float32,) * 2
    with pytest.raises(TypeError, match="compute_dtype must be 'auto', None"):
        Linear4bit.from_linear(torch.nn.Linear(64, 32), compute_dtype="bf16")


def test_train_config_resolves_auto_in_place_and_says_why(cpu):
    from nf4lora.train import TrainConfig

    cpu("AVX2")
    config = TrainConfig()
    assert config.compute_dtype == "auto" and config.bf16 is None
    said = config.resolve(torch.device("cpu"))
    assert said == "float32 (this CPU has no native bf16: AVX2)"
    assert config.compute_dtype == "float32" and config.bf16 is False
    cpu("AVX512-BF16")
    config = TrainConfig()
    assert config.resolve(torch.device("cpu")).startswith("bfloat16 (")
    assert config.compute_dtype == "bfloat16" and config.bf16 is True
    # explicit values stay as given
    config = TrainConfig(compute_dtype="float32", bf16=True)
    config.resolve(torch.device("cpu"))
    assert config.compute_dtype == "float32" and config.bf16 is True


def test_resume_compares_what_auto_chose(cpu):
    """A checkpoint records the resolved dtype: resuming with "auto" on a machine that chooses the same dtype
    works; on one that chooses another it is refused, and the message says what auto chose and why."""
    from nf4lora.train import TrainConfig

    cpu("AVX512-BF16")
    saved = TrainConfig()
    saved.resolve(torch.device("cpu"))
    again = TrainConfig()
    again.resolve(torch.device("cpu"))
    again.check_resumes(saved.to_dict(), "ckpt")
    cpu("AVX2")
    elsewhere = TrainConfig()
    elsewhere.resolve(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"--compute-dtype: saved 'bfloat16', given 'float32' \(auto: this CPU has "
                                         r"no native bf16: AVX2\)"):  # fmt: skip
        elsewhere.check_resumes(saved.to_dict(), "ckpt")
