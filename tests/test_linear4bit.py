"""Linear4bit against bitsandbytes' Linear4bit (the reference): state dicts both ways, outputs, gradients; plus
the module contract (shapes, no_grad, autocast, .to() moves bytes, forward never mutates) and bad input.

bitsandbytes 0.50's CPU dequantize kernel (its AVX-512 branch) decodes rows whose length is not a multiple of the
blocksize wrongly (e.g. in_features=96 with blocksize 64 differs by ~2.0 from its own quantizer's input), so the
comparisons use in_features that are multiples of the blocksize, as every real model has.
"""

import copy

import pytest
import torch
from reference_packages import require
from torch import nn

bnb = require("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit as bnb_dequantize_4bit  # noqa: E402
from bitsandbytes.nn import Linear4bit as BnbLinear4bit  # noqa: E402
from bitsandbytes.nn import Params4bit  # noqa: E402

from nf4lora.lora import Linear4bit  # noqa: E402
from nf4lora.nf4 import quantize_4bit  # noqa: E402

IN, OUT = 128, 64
CONFIGS = [(qt, dq) for qt in ("nf4", "fp4") for dq in (True, False)]


def _linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def _bnb_from_linear(linear, quant_type, double_quant, compute_dtype=None):
    layer = BnbLinear4bit(IN, OUT, bias=linear.bias is not None, quant_type=quant_type,
                          compress_statistics=double_quant, compute_dtype=compute_dtype)  # fmt: skip
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes when the layer is moved to a device


def _bnb_from_state_dict(sd, quant_type, double_quant, compute_dtype=None):
    """What transformers does to load a 4-bit checkpoint into bitsandbytes' Linear4bit."""
    layer = BnbLinear4bit(IN, OUT, bias="bias" in sd, quant_type=quant_type, compress_statistics=double_quant,
                          compute_dtype=compute_dtype)  # fmt: skip
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    if "bias" in sd:
        layer.bias = nn.Parameter(sd["bias"])
    return layer


def _forward_backward(layer, x):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y))
    bias = getattr(layer, "bias", None)  # a LoRALinear has none of its own
    bias_grad = None if bias is None else bias.grad.clone()
    return y.detach(), x.grad, bias_grad


@pytest.mark.parametrize("quant_type,double_quant", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bnb_state_dict_loads_into_ours(quant_type, double_quant, dtype):
    linear = _linear()
    ref = _bnb_from_linear(linear, quant_type, double_quant, compute_dtype=dtype)
    sd = ref.state_dict()
    # default nf4 + DQ: the loaded state replaces the settings; compute_dtype=None computes in x.dtype, as
    # bitsandbytes does with the compute_dtype it was given
    ours = Linear4bit(IN, OUT, compute_dtype=None)
    ours.load_state_dict(sd)
    assert (ours.quant_type, ours.double_quant) == (quant_type, double_quant)
    # Same keys, same bytes (the JSON blob included) when written back out.
    ours_sd = ours.state_dict()
    assert set(ours_sd) == set(sd)
    for key in sd:
        assert torch.equal(ours_sd[key], sd[key]), key

    # Both dequantize and then call F.linear on the CPU: same arithmetic, so outputs and grads are bit-identical.
    x = torch.randn(3, 5, IN, dtype=dtype)
    y_ref, gx_ref, gb_ref = _forward_backward(ref, x)
    y, gx, gb = _forward_backward(ours, x)
    assert y.dtype == dtype
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    assert torch.allclose(gb, gb_ref.to(gb.dtype), rtol=1e-6, atol=1e-6)  # bnb sums in the bias dtype after a cast


@pytest.mark.parametrize("quant_type,double_quant", CONFIGS)
def test_our_state_dict_loads_into_bnb(quant_type, double_quant):
    linear = _linear(seed=1)
    # compute_dtype=None: x.dtype, as bitsandbytes' default
    ours = Linear4bit.from_linear(linear, quant_type=quant_type, double_quant=double_quant, compute_dtype=None)
    sd = ours.state_dict()
    ref = _bnb_from_state_dict(sd, quant_type, double_quant)
    w_ref = bnb_dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(ours.dequantize(), w_ref)
    x = torch.randn(7, IN)
    y_ref, gx_ref, _ = _forward_backward(ref, x)
    y, gx, _ = _forward_backward(ours, x)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    # bitsandbytes' own serialisation of what it loaded is ours, byte for byte.
    ref_sd = ref.state_dict()
    assert set(ref_sd) == set(sd)
    assert all(torch.equal(ref_sd[k], sd[k]) for k in sd)


def test_bnb_inference_kernel_agrees_within_tolerance():
    """In eval + no_grad on the CPU, bitsandbytes repacks the weight for its AVX512-BF16 kernel: different
    arithmetic, so the comparison is within bf16 tolerance (one bf16 ulp of the output scale, 2**-8 * max|y|)."""
    linear = _linear(seed=2)
    ours = Linear4bit.from_linear(linear)
    ref = _bnb_from_state_dict(ours.state_dict(), "nf4", True, compute_dtype=torch.bfloat16).eval()
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref, y = ref(x), ours(x)
    tol = 2**-8 * y.abs().max().item()
    assert torch.allclose(y.float(), y_ref.float(), rtol=2**-7, atol=tol)


@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3), (2, 1, 3)])
def test_any_leading_shape(lead):
    layer = Linear4bit.from_linear(_linear(seed=3))
    x = torch.randn(*lead, IN)
    y = layer(x)
    assert y.shape == (*lead, OUT)
    flat = layer(x.reshape(-1, IN)).reshape(*lead, OUT)
    assert torch.equal(y, flat)


def test_no_grad_and_bias_free():
    layer = Linear4bit.from_linear(_linear(seed=4, bias=False))
    assert layer.bias is None
    x = torch.randn(6, IN, requires_grad=True)
    y_grad = layer(x)
    with torch.no_grad():
        y = layer(x)
    assert not y.requires_grad and y.grad_fn is None
    assert torch.equal(y, y_grad.detach())


def test_autocast_matches_torch_linear_on_dequantized_weight():
    """Under CPU autocast the output is bf16 and equals torch's own autocast linear on the weight dequantized by
    bitsandbytes (both round float32(code * absmax) once to bf16)."""
    linear = _linear(seed=5)
    ours = Linear4bit.from_linear(linear)
    ref_layer = _bnb_from_state_dict(ours.state_dict(), "nf4", True)
    dense = nn.Linear(IN, OUT)
    with torch.no_grad():
        dense.weight.copy_(bnb_dequantize_4bit(ref_layer.weight.data, ref_layer.weight.quant_state))
        dense.bias.copy_(linear.bias)
    x = torch.randn(2, 9, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = ours(x), dense(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)


def test_compute_dtype_casts_and_returns_input_dtype():
    linear = _linear(seed=6)
    ours = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    ref = _bnb_from_state_dict(ours.state_dict(), "nf4", True, compute_dtype=torch.bfloat16)
    x = torch.randn(4, IN)  # float32 input, bf16 compute, float32 output (bitsandbytes' convention)
    y_ref, _, _ = _forward_backward(ref, x)
    y, _, _ = _forward_backward(ours, x)
    assert y.dtype == torch.float32
    assert torch.equal(y, y_ref)


def test_forward_on_the_meta_device_gives_shapes():
    """Shape inference with empty weights: the meta device has no autocast state to ask."""
    layer = Linear4bit.from_linear(_linear(seed=7)).to("meta")
    y = layer(torch.empty(3, layer.in_features, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, layer.out_features)


def test_to_moves_bytes_and_never_touches_the_state():
    layer = Linear4bit.from_linear(_linear(seed=7))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    layer.half()
    after = layer.state_dict()
    assert layer.bias.dtype == torch.float16  # the bias follows dtype casts like any parameter
    for key, value in before.items():
        if key != "bias":  # packed codes, block scales, maps, metadata: unchanged bytes and dtypes
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    layer.to("meta")
    state = layer.quant_state
    assert layer.weight.is_meta and state.absmax.is_meta and state.code.is_meta
    assert state.nested.absmax.is_meta and state.offset.is_meta
    layer = Linear4bit(IN, OUT)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match="would turn the packed 4-bit weight into torch.float16: .* uint8"):
        layer.type(torch.float16)  # casts every tensor: refused before anything changed
    after = layer.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_forward_and_backward_never_mutate_state():
    layer = Linear4bit.from_linear(_linear(seed=8))
    state = layer.quant_state
    before = copy.deepcopy(layer.state_dict())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3, IN, dtype=dtype, requires_grad=True)
        layer(x).sum().backward()
    assert layer.quant_state is state
    after = layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_from_quantized_shares_the_given_tensors():
    linear = _linear(seed=9)
    packed, state = quantize_4bit(linear.weight.detach(), blocksize=128, quant_type="fp4", double_quant=False)
    layer = Linear4bit.from_quantized(packed, state, linear.bias.detach())
    assert layer.weight.data_ptr() == packed.data_ptr() and layer.quant_state is state
    assert (layer.in_features, layer.out_features, layer.blocksize) == (IN, OUT, 128)
    x = torch.randn(2, IN)
    assert torch.equal(layer(x), Linear4bit.from_linear(linear, blocksize=128, quant_type="fp4", double_quant=False)(x))


def test_bad_input():
    with pytest.raises(ValueError, match="in_features"):
        Linear4bit(0, 4)
    with pytest.raises(ValueError, match="out_features"):
        Linear4bit(4, True)
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(IN, OUT, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(IN, OUT, quant_type="int4")
    with pytest.raises(TypeError, match="compute_dtype"):
        Linear4bit(IN, OUT, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))
    packed, state = quantize_4bit(torch.randn(OUT, IN))
    with pytest.raises(ValueError, match="packed data and state do not match"):
        Linear4bit.from_quantized(packed[:-1], state)
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        Linear4bit.from_quantized(packed, state, bias=torch.zeros(OUT + 1))
    packed3, state3 = quantize_4bit(torch.randn(2, OUT, IN))
    with pytest.raises(ValueError, match="2-D"):
        Linear4bit.from_quantized(packed3, state3)
    layer = Linear4bit.from_quantized(packed, state)
    with pytest.raises(ValueError, match=rf"\(\.\.\., {IN}\)"):
        layer(torch.randn(2, IN + 1))
    with pytest.raises(TypeError, match="x must be float32"):
        layer(torch.ones(2, IN, dtype=torch.int64))


def test_bad_state_dicts_are_refused_with_the_key():
    layer = Linear4bit(IN, OUT)
    with pytest.raises(RuntimeError, match="weight is torch.float32 .* quantized explicitly"):
        layer.load_state_dict(nn.Linear(IN, OUT).state_dict())
    other = Linear4bit(IN, OUT + 2).state_dict()
    with pytest.raises(RuntimeError, match=r"cannot load the 4-bit weight weight: its shape is \(66, 128\)"):
        layer.load_state_dict(other)
    sd = Linear4bit(IN, OUT).state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match="Missing key.*weight.quant_state.bitsandbytes__nf4"):
        layer.load_state_dict(sd)
    sd = Linear4bit(IN, OUT).state_dict()
    sd["weight.scales"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key.*weight.scales"):
        layer.load_state_dict(sd)
    before = layer.state_dict()
    with pytest.raises(RuntimeError):
        layer.load_state_dict(other)
    assert all(torch.equal(layer.state_dict()[k], before[k]) for k in before)  # a refused load changes nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("frozen_base", [False, True], ids=["trainable_bias", "frozen_base"])
def test_cuda_layer_with_lora_matches_the_cpu_layer(frozen_base):
    """.to("cuda") moves the packed weight and every state tensor; the Triton path then computes what the CPU
    path does, up to fp32 summation order before the one bf16 rounding (tolerance: 2 bf16 ulps of max |y|).
    A frozen base takes LoRALinear's fused path (matmul_4bit_grad_input in backward), a trainable bias autograd's."""
    from nf4lora.lora import LoRALinear

    cpu = LoRALinear(Linear4bit.from_linear(_linear(seed=10), compute_dtype=torch.bfloat16), r=4, alpha=8)
    cpu.base_layer.requires_grad_(not frozen_base)
    with torch.no_grad():
        cpu.lora_B.weight.normal_()
    gpu = copy.deepcopy(cpu).to("cuda")
    fused = gpu(torch.randn(2, IN, dtype=torch.bfloat16, device="cuda")).grad_fn.name() == "_FrozenBaseLoRABackward"
    assert fused == frozen_base
    state = gpu.base_layer.quant_state
    assert gpu.base_layer.weight.is_cuda and state.absmax.is_cuda and state.code.is_cuda
    assert state.nested.absmax.is_cuda and state.nested.code.is_cuda and state.offset.is_cuda
    for rows in (1, 33):  # the batch-1 GEMV and the fused matmul
        x = torch.randn(rows, IN, dtype=torch.bfloat16)
        y_cpu, gx_cpu, _ = _forward_backward(cpu, x)
        y_gpu, gx_gpu, _ = _forward_backward(gpu, x.cuda())
        for got, want in ((y_gpu.cpu(), y_cpu), (gx_gpu.cpu(), gx_cpu)):
            tol = 2**-7 * want.abs().max().item()
            assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=tol)


def test_load_copies_unless_assign():
    source = Linear4bit.from_linear(_linear(seed=11), quant_type="fp4")
    sd = source.state_dict()
    copied, assigned = Linear4bit(IN, OUT), Linear4bit(IN, OUT)
    copied.load_state_dict(sd)
    assigned.load_state_dict(sd, assign=True)
    assert assigned.weight.data_ptr() == sd["weight"].data_ptr()
    assert assigned.quant_state.absmax.data_ptr() == sd["weight.absmax"].data_ptr()
    assert copied.weight.data_ptr() != sd["weight"].data_ptr()
    assert copied.quant_state.absmax.data_ptr() != sd["weight.absmax"].data_ptr()
    x = torch.randn(3, IN)
    assert torch.equal(copied(x), source(x)) and torch.equal(assigned(x), source(x))
