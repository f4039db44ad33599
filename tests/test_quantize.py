"""nf4/ on its own: chunking, memory, round trips, errors, metrics."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import nf4lora.nf4.quantize as quantize_module
from nf4lora.nf4 import (
    DYNAMIC_MAP,
    FP4_CODE,
    NF4_CODE,
    QuantState,
    bits_per_parameter,
    dequantize_4bit,
    error_report,
    max_abs_error,
    mse,
    quantize_4bit,
    relative_error,
    sqnr_db,
)


def test_code_tables():
    assert NF4_CODE.shape == (16,) and NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[15] == 1
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert torch.equal(FP4_CODE[8:].abs(), FP4_CODE[:8]) and FP4_CODE[3] == 1
    assert DYNAMIC_MAP.shape == (256,) and DYNAMIC_MAP[127] == 0 and DYNAMIC_MAP[255] == 1
    assert torch.all(DYNAMIC_MAP[1:] > DYNAMIC_MAP[:-1])


def test_tables_equal_bitsandbytes():
    import bitsandbytes.functional as bnbF

    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(DYNAMIC_MAP, bnbF.create_dynamic_map())


@pytest.mark.parametrize("chunk", [4096, 8192, 3 * 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_chunk_size_does_not_change_results(monkeypatch, chunk, quant_type):
    w = torch.randn(37, 1001, dtype=torch.bfloat16)  # odd numel, several chunks, a partial last chunk
    ref_packed, ref_state = quantize_4bit(w, quant_type=quant_type)
    monkeypatch.setattr(quantize_module, "CHUNK_ELEMENTS", chunk)
    packed, state = quantize_4bit(w, quant_type=quant_type)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax) and torch.equal(state.offset, ref_state.offset)
    assert torch.equal(state.nested.absmax, ref_state.nested.absmax)
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit(ref_packed, ref_state))


def test_quantize_memory_is_a_fraction_of_the_weight():
    """Quantizing a 64 MiB bf16 matrix must not allocate a float32 copy of it (128 MiB): peak RSS growth < 48 MiB."""
    code = textwrap.dedent(
        """
        import resource, torch
        from nf4lora.nf4 import quantize_4bit
        torch.set_num_threads(1)
        quantize_4bit(torch.randn(64, 4096, dtype=torch.bfloat16))  # warm up allocator and code paths
        w = torch.randn(4096, 8192, dtype=torch.bfloat16)  # 64 MiB
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        packed, state = quantize_4bit(w)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 48, f"peak RSS grew by {growth_mib:.1f} MiB while quantizing a 64 MiB weight"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_error_bound_and_shape(quant_type, double_quant):
    w = torch.randn(33, 65, dtype=torch.float16)
    packed, state = quantize_4bit(w, blocksize=32, quant_type=quant_type, double_quant=double_quant)
    y = dequantize_4bit(packed, state)
    assert y.shape == w.shape and y.dtype == w.dtype
    # each element lands within half the widest gap of its table (NF4 0.304, FP4 1/3) times its block's absmax
    half_gap = 0.1521 if quant_type == "nf4" else 1 / 6
    scale = state.absmax_float32().repeat_interleave(32)[: w.numel()].view_as(w)
    slack = 1e-2 if double_quant else 1e-3  # double quantization perturbs absmax by < 1%
    assert torch.all((y.float() - w.float()).abs() <= scale * (half_gap + slack) + 1e-3)


def test_exact_values_survive():
    """Values that are exactly table values times absmax come back exactly (no DQ)."""
    absmax = 2.0
    w = (NF4_CODE * absmax).repeat(4)  # 64 elements, one block
    packed, state = quantize_4bit(w, double_quant=False)
    assert torch.equal(dequantize_4bit(packed, state), w)


def test_to_device_moves_bytes_only():
    w = torch.randn(8, 64)
    packed, state = quantize_4bit(w)
    moved = state.to("cpu")
    assert moved is not state and torch.equal(moved.absmax, state.absmax)
    assert torch.equal(dequantize_4bit(packed, moved), dequantize_4bit(packed, state))


def test_bits_per_parameter():
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    _, plain = quantize_4bit(w, double_quant=False)
    _, dq = quantize_4bit(w, double_quant=True)
    assert bits_per_parameter(plain) == pytest.approx(4.5)
    assert bits_per_parameter(dq) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)


def test_metrics():
    x = torch.tensor([1.0, -2.0, 3.0, 4.0])
    y = torch.tensor([1.0, -2.0, 2.0, 4.5])
    assert mse(x, y) == pytest.approx((1 + 0.25) / 4)
    assert max_abs_error(x, y) == pytest.approx(1.0)
    assert sqnr_db(x, y) == pytest.approx(10 * math.log10(30 / 1.25))
    assert relative_error(x, y) == pytest.approx(math.sqrt(1.25 / 30))
    assert sqnr_db(x, x) == math.inf
    report = error_report(x, y)
    assert set(report) == {"mse", "max_abs_error", "sqnr_db", "relative_error"}
    with pytest.raises(ValueError, match="shapes differ"):
        mse(x, y[:3])


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.complex64, torch.float64, torch.bool])
def test_rejects_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match="w must be float32, float16 or bfloat16"):
        quantize_4bit(torch.zeros(64, dtype=dtype))


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_4bit([1.0, 2.0])


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 0, -64, 64.0, True])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_4bit(torch.randn(128), blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["int4", "NF4", "", None])
def test_rejects_unknown_quant_type(quant_type):
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_4bit(torch.randn(128), quant_type=quant_type)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_nan_and_inf(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in elements 128\.\.191"):
        quantize_4bit(w)


def test_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(torch.empty(0, 64))


@pytest.fixture
def quantized():
    return quantize_4bit(torch.randn(10, 13))  # 130 elements -> 65 bytes, 3 blocks


def test_rejects_truncated_or_long_packed(quantized):
    packed, state = quantized
    with pytest.raises(ValueError, match=r"packed has shape \(64, 1\).*do not match"):
        dequantize_4bit(packed[:-1], state)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_4bit(torch.cat([packed, packed[:1]]), state)


def test_rejects_packed_of_wrong_shape_or_dtype(quantized):
    packed, state = quantized
    with pytest.raises(ValueError, match=r"packed has shape \(5, 13\)"):
        dequantize_4bit(packed.view(5, 13), state)
    with pytest.raises(TypeError, match="packed must be uint8"):
        dequantize_4bit(packed.to(torch.int8), state)
    with pytest.raises(TypeError, match="packed must be uint8"):
        dequantize_4bit(packed.float(), state)
    with pytest.raises(TypeError, match="state must be a QuantState"):
        dequantize_4bit(packed, {"absmax": state.absmax})
    with pytest.raises(TypeError, match="dtype must be"):
        dequantize_4bit(packed, state, dtype=torch.int8)


def test_rejects_inconsistent_state(quantized):
    packed, state = quantized
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"absmax has shape \(2,\), expected \(3,\)"):
        replace(state, absmax=state.absmax[:2])
    with pytest.raises(TypeError, match="absmax must be uint8 codes with double quantization"):
        replace(state, absmax=state.absmax.float())
    with pytest.raises(ValueError, match="offset must be a float32 scalar"):
        replace(state, offset=None)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        replace(state, blocksize=100)
    with pytest.raises(ValueError, match="nested absmax"):
        replace(state, nested=replace(state.nested, absmax=torch.zeros(2)))
    _, plain = quantize_4bit(torch.randn(10, 13), double_quant=False)
    with pytest.raises(TypeError, match="absmax must be float32 without double quantization"):
        replace(plain, absmax=plain.absmax.half())


def test_rejects_bad_state_dict(quantized):
    packed, state = quantized
    sd = state.to_state_dict("w.")
    missing = {k: v for k, v in sd.items() if not k.endswith("nested_absmax")}
    with pytest.raises(ValueError, match="missing tensor 'w.nested_absmax'"):
        QuantState.from_state_dict(missing, "w.")
    with pytest.raises(ValueError, match="exactly one 'w.quant_state.bitsandbytes__nf4|fp4'"):
        QuantState.from_state_dict({k: v for k, v in sd.items() if "quant_state" not in k}, "w.")
    corrupt = dict(sd, **{"w.quant_state.bitsandbytes__nf4": torch.tensor([123, 34, 255], dtype=torch.uint8)})
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        QuantState.from_state_dict(corrupt, "w.")
    short = dict(sd, **{"w.absmax": sd["w.absmax"][:-1]})
    with pytest.raises(ValueError, match="absmax has shape"):
        QuantState.from_state_dict(short, "w.")
    # round trip of a good one
    back = QuantState.from_state_dict(sd, "w.")
    assert torch.equal(dequantize_4bit(packed, back), dequantize_4bit(packed, state))


def test_rejects_packed_on_another_device(quantized):
    packed, state = quantized
    with pytest.raises(ValueError, match="packed is on meta but the state is on cpu"):
        dequantize_4bit(packed.to("meta"), state)


def test_rejects_state_dict_whose_key_and_json_disagree(quantized):
    _, state = quantized
    sd = state.to_state_dict("w.")
    renamed = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"w.quant_state.bitsandbytes__fp4 says quant_type 'nf4'"):
        QuantState.from_state_dict(renamed, "w.")


def test_states_compare_by_identity_and_exact_zeros_have_no_error():
    w = torch.zeros(64)
    packed, state = quantize_4bit(w)
    assert state == state and state != quantize_4bit(w)[1]  # identity; field-wise == on tensors would raise
    assert relative_error(w, dequantize_4bit(packed, state)) == 0.0
