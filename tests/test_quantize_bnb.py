"""nf4/ against bitsandbytes on the CPU: packed bytes, absmax, double quantization, dequantization, state dicts.

bitsandbytes is the reference here (its CPU quantize_4bit is the torch path in backends/default/ops.py; its CPU
8-bit quantizer and 4-bit dequantizer are C kernels).
"""

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.cextension import lib as bnb_lib

from nf4lora.nf4 import BLOCKSIZES, DYNAMIC_MAP, QuantState, dequantize_4bit, quantize_4bit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bitsandbytes' CPU dequantize C kernel has an AVX-512 branch, taken where cpuid reports AVX-512F (no setting
# changes it) and the last dimension is a multiple of 16, and a scalar branch: they differ in the sign of FP4
# code 8 and in where blocks start (see the two tests that use this).
BNB_CPU_KERNEL_AVX512 = bool(bnb_lib.has_avx512f_cpu())


def make_weight(kind: str, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + blocksize)
    if kind == "single":
        return torch.randn(1, generator=g).to(dtype)
    if kind == "odd":  # odd numel: the last low nibble is padding
        return torch.randn(37, 29, generator=g).to(dtype)
    if kind == "partial":  # several blocks for every blocksize, a partial last one for most
        return (torch.randn(5, 1733, generator=g) * 0.02).to(dtype)
    if kind == "straddle":  # even last dimension, blocks straddling rows (the CPU kernel's path)
        return torch.randn(24, 80, generator=g).to(dtype)
    if kind == "zero_block":  # one all-zero full block in the middle, heavy tails elsewhere
        w = student_t3((3, blocksize), g).to(dtype)
        w[1] = 0
        return w
    raise AssertionError(kind)


def student_t3(shape, generator: torch.Generator) -> torch.Tensor:
    """Student-t samples with 3 degrees of freedom (heavy tails, like LLM weights), drawn from `generator`:
    z / sqrt(chi2_3 / 3), chi2_3 a sum of three squared normals (torch.distributions takes no generator)."""
    z = torch.randn(4, *shape, generator=generator)
    return z[0] / (z[1:].square().sum(0) / 3).sqrt()


def bnb_quantize(w, blocksize, quant_type, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def bnb_dequantize(packed, bnb_state, out_shape=None):
    """bitsandbytes.functional.dequantize_4bit, called with the flattened shape.

    bitsandbytes 0.50.2's CPU dequantize kernel (used when the last dimension is even) restarts blocks at every
    row on its AVX-512 branch, while its quantizer (and CUDA, its scalar branch and docs/formats.md) cut blocks
    from the flattened tensor: for a (48, 80) weight in blocks of 64 it returns wrong values on AVX-512 CPUs (see
    test_bitsandbytes_cpu_dequantize_row_blocks). With the flat shape, rows and blocks agree, and both branches
    compute the format's result.
    """
    shape = bnb_state.shape
    bnb_state.shape = torch.Size([shape.numel()])
    try:
        return bnbF.dequantize_4bit(packed, bnb_state).reshape(out_shape or shape)
    finally:
        bnb_state.shape = shape


def to_ours(bnb_state) -> QuantState:
    """bitsandbytes state -> ours, through the serialized (state-dict) format."""
    return QuantState.from_state_dict(bnb_state.as_dict(packed=True))


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64 4-bit codes of a packed weight, the high nibble first (docs/formats.md 2)."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n].long()


def assert_bit_identical(got, expected, packed, quant_type):
    """Every bit of `got` equals `expected`, except the one documented divergence: the sign of FP4 code 8's zero.

    FP4 code 8 is the sign bit with a zero magnitude. bitsandbytes' quant_map holds +0.0 there, and its CPU
    kernel's AVX-512 branch and its torch fallback decode +0.0, as nf4/ does (docs/formats.md 1); its CPU kernel's
    scalar branch (every CPU without AVX-512) and its CUDA kernel give -0.0. So where the code is 8 (FP4 only)
    both values must be zeros, of either sign; anywhere else a difference in any bit fails.
    """
    assert got.dtype == expected.dtype and got.shape == expected.shape
    a, b = (t.reshape(-1).view({4: torch.int32, 2: torch.int16}[t.element_size()]) for t in (got, expected))
    zero_sign_free = unpack_codes(packed, a.numel()) == 8 if quant_type == "fp4" else torch.zeros_like(a, dtype=bool)
    differ = ((a != b) & ~zero_sign_free).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{differ.numel()} of {a.numel()} values differ, e.g. at {differ[:4].tolist()}: ours "
        f"{got.reshape(-1)[differ[:4]].tolist()}, bitsandbytes {expected.reshape(-1)[differ[:4]].tolist()}"
    )
    magnitude = torch.iinfo(a.dtype).max  # every bit but the sign
    assert not torch.any(zero_sign_free & (((a & magnitude) != 0) | ((b & magnitude) != 0))), "FP4 code 8 not zero"


@pytest.mark.parametrize("kind", ["single", "odd", "partial", "zero_block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_matches_bitsandbytes(quant_type, blocksize, dtype, kind):
    w = make_weight(kind, blocksize, dtype)

    # Without double quantization: packed bytes and float32 absmax.
    packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=False)
    ref_packed, ref_state = bnb_quantize(w, blocksize, quant_type, double_quant=False)
    assert packed.shape == ref_packed.shape and packed.dtype == ref_packed.dtype
    assert torch.equal(state.absmax, ref_state.absmax)
    # Identical codes in a partial last block too: bitsandbytes' CPU quantizer scales it by x / absmax where full
    # blocks take x * (1 / absmax), and nf4/ does the same (test_fp4_partial_block_is_divided_as_bitsandbytes_does
    # shows a value where the two round differently).
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.code, ref_state.code)

    # With double quantization: same packed bytes; identical offset and nested absmax; nested codes nearest.
    packed_dq, state_dq = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=True)
    ref_packed_dq, ref_dq = bnb_quantize(w, blocksize, quant_type, double_quant=True)
    assert torch.equal(packed_dq, packed)
    assert torch.equal(state_dq.offset, ref_dq.offset)
    assert torch.equal(state_dq.nested.absmax, ref_dq.state2.absmax)
    assert torch.equal(state_dq.nested.code, ref_dq.state2.code)
    assert_nested_codes_at_least_as_near(state.absmax, state_dq, ref_dq.absmax)


def assert_nested_codes_at_least_as_near(absmax, ours: QuantState, ref_codes: torch.Tensor):
    """Where our 8-bit absmax codes differ from bitsandbytes', ours must be at least as near the true value.

    The true value is s = (absmax - offset) / nested_absmax in float32 (docs/formats.md 3.2); distances in float64.
    """
    v = absmax - ours.offset
    scale = ours.nested.absmax.clamp(min=1e-38).repeat_interleave(256)[: v.numel()]
    s = (v / scale).double()
    table = DYNAMIC_MAP.double()
    d_ours = (table[ours.absmax.long()] - s).abs()
    d_ref = (table[ref_codes.long()] - s).abs()
    assert torch.all(d_ours <= d_ref), "a nested code is farther from the true value than bitsandbytes' code"
    # and ours is the exact nearest code, ties to the lower index
    d_all = (table[None, :] - s[:, None]).abs()  # (n_blocks, 256)
    assert torch.equal(ours.absmax.long(), d_all.argmin(dim=1))


def test_nested_codes_differ_from_bitsandbytes_lut_somewhere():
    """bitsandbytes' CPU 8-bit quantizer uses a lookup table that is not always nearest: show we are nearer there."""
    w = student_t3((512, 512), torch.Generator().manual_seed(0))
    _, plain = quantize_4bit(w, double_quant=False)
    _, ours = quantize_4bit(w, double_quant=True)
    _, ref = bnb_quantize(w, 64, "nf4", double_quant=True)
    assert_nested_codes_at_least_as_near(plain.absmax, ours, ref.absmax)
    differ = (ours.absmax != ref.absmax).sum().item()
    assert 0 < differ < ours.absmax.numel() * 0.05  # same algorithm apart from rounding at the edges (6 of 4096)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("kind", ["odd", "partial", "zero_block", "straddle"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bitsandbytes_data_is_bit_identical(quant_type, blocksize, dtype, kind, double_quant):
    w = make_weight(kind, blocksize, dtype)
    ref_packed, ref_state = bnb_quantize(w, blocksize, quant_type, double_quant)
    expected = bnb_dequantize(ref_packed, ref_state)
    got = dequantize_4bit(ref_packed, to_ours(ref_state))
    assert got.dtype == dtype
    assert_bit_identical(got, expected, ref_packed, quant_type)


def test_bit_identity_allows_only_the_sign_of_fp4_code_8():
    """The comparison above is strict everywhere else: a sign flipped on another zero, a nonzero at code 8, one
    ulp or a sign anywhere else, or the same -0.0 in NF4 data all fail it."""
    w = make_weight("straddle", 64, torch.bfloat16)
    packed, state = quantize_4bit(w, blocksize=64, quant_type="fp4", double_quant=False)
    got = dequantize_4bit(packed, state).reshape(-1)
    codes = unpack_codes(packed, w.numel())
    at_8, at_0 = (codes == 8).nonzero().flatten(), (codes == 0).nonzero().flatten()
    nonzero = (got != 0).nonzero().flatten()
    assert at_8.numel() and at_0.numel() and nonzero.numel()
    minus_zero = got.clone()
    minus_zero[at_8] = -0.0
    assert_bit_identical(got, minus_zero, packed, "fp4")
    assert_bit_identical(minus_zero, got, packed, "fp4")

    def changed(i, bits):  # minus_zero with element i's int16 bits replaced by bits(old bits)
        wrong = minus_zero.clone()
        wrong.view(torch.int16)[i] = bits(wrong.view(torch.int16)[i])
        return wrong

    sign = torch.iinfo(torch.int16).min
    for i, bits, error in [(at_0[0], lambda b: b | sign, "1 of 1920 values differ"),  # -0.0 at code 0
                           (at_8[0], lambda b: b + 1, "FP4 code 8 not zero"),  # smallest subnormal at code 8
                           (nonzero[0], lambda b: b ^ sign, "1 of 1920 values differ"),  # a sign elsewhere
                           (nonzero[0], lambda b: b + 1, "1 of 1920 values differ")]:  # one ulp elsewhere
        with pytest.raises(AssertionError, match=error):
            assert_bit_identical(got, changed(i, bits), packed, "fp4")
    with pytest.raises(AssertionError, match="values differ"):
        assert_bit_identical(got, minus_zero, packed, "nf4")


@pytest.mark.parametrize("n", [1920, 1928])
def test_bitsandbytes_cpu_kernel_decodes_fp4_code_8_as_minus_zero_on_its_scalar_branch(n):
    """The divergence is real where docs/formats.md 1 says: bitsandbytes' C kernel gives -0.0 for code 8 on its
    scalar branch (CPUs without AVX-512, and a last dimension that is not a multiple of 16 on any CPU) and +0.0 on
    its AVX-512 branch; its quant_map and nf4/ give +0.0 on every CPU."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed, bnb_state = bnb_quantize(w, 64, "fp4", double_quant=False)
    at_8 = unpack_codes(packed, n) == 8
    assert at_8.any()
    theirs = bnb_dequantize(packed, bnb_state)[at_8]  # an even last dimension: the C kernel
    scalar_branch = not BNB_CPU_KERNEL_AVX512 or n % 16 != 0
    assert torch.all(theirs == 0) and torch.all(theirs.signbit() == scalar_branch)
    assert not bnb_state.code[8].signbit()
    ours = dequantize_4bit(packed, to_ours(bnb_state))[at_8]
    assert torch.all(ours == 0) and not torch.any(ours.signbit())


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_to_other_dtype_is_float32_product_rounded(out_dtype):
    """dequantize_4bit(dtype=...) equals bitsandbytes dequantizing to float32 and rounding to the dtype once."""
    w = make_weight("partial", 64, torch.bfloat16)
    ref_packed, ref_state = bnb_quantize(w, 64, "nf4", double_quant=True)
    ref_state.dtype = torch.float32
    expected = bnb_dequantize(ref_packed, ref_state).to(out_dtype)
    assert_bit_identical(dequantize_4bit(ref_packed, to_ours(ref_state), dtype=out_dtype), expected, ref_packed, "nf4")


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_partial_last_block(double_quant):
    """bitsandbytes stores a partial last block's absmax clamped to 1e-38 (an all-zero one: 1e-38, where its full
    blocks store 0.0): so do we, and the double-quantized constants follow from it."""
    w = torch.randn(64 * 3 + 10)
    w[64:128] = 0  # an all-zero full block too
    w[192:] = 0
    packed, state = quantize_4bit(w, double_quant=double_quant)
    ref_packed, ref_state = bnb_quantize(w, 64, "nf4", double_quant=double_quant)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert state.absmax_float32()[1].item() == 0.0 or double_quant
    assert state.absmax_float32()[-1].item() == pytest.approx(1e-38) or double_quant
    if double_quant:
        assert torch.equal(state.nested.absmax, ref_state.state2.absmax)
        assert state.offset.item() == ref_state.offset.item()
    assert_bit_identical(dequantize_4bit(packed, state), bnb_dequantize(ref_packed, ref_state), packed, "nf4")
    assert torch.all(dequantize_4bit(packed, state)[192:] == 0)


def test_fp4_partial_block_is_divided_as_bitsandbytes_does():
    """A partial last block is scaled by x / absmax, full blocks by x * (1 / absmax): next to FP4's exactly
    representable midpoints the two round differently (-5 / 24 = -2.5 / 12 lies on one)."""
    w = torch.tensor([24.0, -5.0, 0.0], dtype=torch.bfloat16)
    packed, state = quantize_4bit(w, quant_type="fp4", double_quant=False)
    ref_packed, ref_state = bnb_quantize(w, 64, "fp4", double_quant=False)
    assert torch.equal(packed, ref_packed)
    assert_bit_identical(dequantize_4bit(packed, state), bnb_dequantize(ref_packed, ref_state), packed, "fp4")
    # the same values inside a full block take the multiply, on both sides
    w = torch.cat([w, torch.zeros(61, dtype=torch.bfloat16)])
    assert torch.equal(quantize_4bit(w, quant_type="fp4", double_quant=False)[0], bnb_quantize(w, 64, "fp4", False)[0])


def test_bitsandbytes_cpu_dequantize_row_blocks():
    """Why bnb_dequantize flattens: on a (48, 80) weight, blocks of 64 straddle rows.

    Called with the real shape, bitsandbytes' CPU kernel disagrees with its own quantizer on its AVX-512 branch
    (its scalar branch, on CPUs without AVX-512, agrees); called with the flat shape both agree with ours bit for bit, and ours
    reconstructs the weight within the NF4 error bound.
    """
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(48), dtype=torch.bfloat16)
    packed, state = bnb_quantize(w, 64, "nf4", double_quant=False)
    ours = dequantize_4bit(packed, to_ours(state))
    assert torch.equal(ours, bnbF.dequantize_4bit(packed, state)) != BNB_CPU_KERNEL_AVX512
    assert_bit_identical(ours, bnb_dequantize(packed, state), packed, "nf4")
    # every element within half the widest NF4 gap (0.30 of absmax) of the original
    bound = state.absmax.repeat_interleave(64)[: w.numel()].view(48, 80) * (0.1521 + 2**-8)  # + bf16 rounding
    assert torch.all((ours.float() - w.float()).abs() <= bound)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_matches_bitsandbytes_format(quant_type, double_quant):
    w = torch.randn(48, 128, dtype=torch.bfloat16)
    packed, state = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    _, ref_state = bnb_quantize(w, 64, quant_type, double_quant)
    ours_sd = state.to_state_dict("layer.weight.")
    ref_sd = {"layer.weight." + k: v for k, v in ref_state.as_dict(packed=True).items()}
    assert ours_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        assert ours_sd[k].dtype == ref_sd[k].dtype and ours_sd[k].shape == ref_sd[k].shape, k
    # the tables to the bit (FP4's entry 8 is +0.0 in bitsandbytes' quant_map: docs/formats.md 1)
    for k in ("layer.weight.quant_map", *(["layer.weight.nested_quant_map"] if double_quant else [])):
        assert torch.equal(ours_sd[k].view(torch.int32), ref_sd[k].view(torch.int32)), k

    # bitsandbytes reads ours and dequantizes our packed weight to exactly our result ...
    stripped = {k.removeprefix("layer.weight."): v for k, v in ours_sd.items()}
    theirs = bnbF.QuantState.from_dict(stripped, device=torch.device("cpu"))
    assert_bit_identical(dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed, theirs), packed, quant_type)
    # ... and we read theirs (the round trip keeps every field)
    back = QuantState.from_state_dict(ref_sd, prefix="layer.weight.")
    assert back.shape == w.shape and back.dtype == w.dtype and back.quant_type == quant_type
    assert back.double_quant == double_quant and back.blocksize == 64


def test_a_nonstandard_quant_map_is_refused():
    """bitsandbytes' kernels decode with their built-in tables whatever the file says: a file whose quant_map
    differs cannot be decoded the same way by both, so reading it is an error (a -0.0 for +0.0 is let through)."""
    _, ref_state = bnb_quantize(torch.randn(4, 64), 64, "fp4", double_quant=False)
    sd = ref_state.as_dict(packed=True)
    sd["quant_map"] = sd["quant_map"].clone()
    sd["quant_map"][8] = -0.0
    assert QuantState.from_state_dict(sd).code[8].view(torch.int32).item() == 0  # the built-in +0.0
    sd["quant_map"][3] = 0.99
    with pytest.raises(ValueError, match="quant_map is not bitsandbytes' fp4 table"):
        QuantState.from_state_dict(sd)
