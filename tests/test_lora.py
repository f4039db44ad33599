"""LoRALinear and model surgery: PEFT as the reference for the forward/backward, and the LoRA invariants
(B = 0 leaves the base output exact, only A/B train, merge/unmerge exact, merging twice refused, 16-bit merge
lossless), plus bad input."""

import copy
import math
import warnings

import pytest
import torch
from reference_packages import require
from torch import nn

peft = require("peft")

from nf4lora.lora import Linear4bit, LoRALinear, add_lora, merge_lora, quantize_model, unmerge_lora  # noqa: E402

# Per-dtype tolerances for comparisons of different (but equivalent) float arithmetic.
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


class MLP(nn.Module):
    """A user's own model: two hidden Linear layers (one inside a submodule) and an output head."""

    def __init__(self, width=64, hidden=128, vocab=32):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.block = nn.Sequential(nn.GELU(), nn.Linear(hidden, width, bias=False))
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, x):
        return self.lm_head(self.block(self.fc1(x)) + x)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP()


def _randomize_b(model, seed=1):
    """Give every adapter a non-zero B (a trained adapter), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def _bases():
    torch.manual_seed(3)
    linear = nn.Linear(64, 96)
    return {"linear": linear, "4bit": Linear4bit.from_linear(linear)}


@pytest.mark.parametrize("base_kind", ["linear", "4bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_zero_b_leaves_the_base_output_exact(base_kind, dtype, dropout):
    base = _bases()[base_kind].to(dtype) if base_kind == "linear" else _bases()[base_kind]
    layer = LoRALinear(base, r=8, alpha=16, dropout=dropout).train()
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(2, 5, 64, dtype=dtype)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_peft(use_rslora):
    model = _mlp()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "1"], use_rslora=use_rslora, init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(model), config)
    names = add_lora(model, r=4, alpha=8, target_modules=["fc1", "block.1"], use_rslora=use_rslora)
    assert names == ["fc1", "block.1"]
    with torch.no_grad():
        for name in names:
            ref_layer = ref.base_model.model.get_submodule(name)
            model.get_submodule(name).lora_A.weight.copy_(ref_layer.lora_A["default"].weight)
            model.get_submodule(name).lora_B.weight.copy_(ref_layer.lora_B["default"].weight)
    x = torch.randn(3, 7, 64)
    y_ref, y = ref(x), model(x)
    assert torch.allclose(y, y_ref, **FP32_TOL)
    (y_ref**2).sum().backward()
    (y**2).sum().backward()
    for name in names:
        ref_layer, layer = ref.base_model.model.get_submodule(name), model.get_submodule(name)
        assert torch.allclose(layer.lora_A.weight.grad, ref_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(layer.lora_B.weight.grad, ref_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def _peft_pair(dtype, base_kind):
    """Our LoRALinear on a frozen base (4-bit computing in `dtype`, or dense in `dtype`) and PEFT's LoRA on an
    nn.Linear holding the same weight (the dequantized 4-bit one), with the same non-zero A and B."""
    torch.manual_seed(5)
    linear = nn.Linear(64, 96)
    base = Linear4bit.from_linear(linear, compute_dtype=dtype) if base_kind == "4bit" else copy.deepcopy(linear).to(dtype)
    dense = copy.deepcopy(linear).to(dtype)
    if base_kind == "4bit":
        with torch.no_grad():
            dense.weight.copy_(base.dequantize(dtype))
    base.requires_grad_(False)
    ours = LoRALinear(base, r=4, alpha=8)
    ref = peft.get_peft_model(nn.Sequential(dense), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    ref_layer = ref.base_model.model[0]
    with torch.no_grad():
        ours.lora_B.weight.copy_(torch.randn(96, 4) * 0.1)
        ref_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        ref_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return ours, ref, ref_layer


@pytest.mark.parametrize("base_kind", ["linear", "4bit"])
def test_fused_adapter_matches_peft_with_input_gradient(base_kind):
    """The frozen-base fast path (adapter products added into the base's output and input gradient in place)
    against PEFT in float32: output, x.grad and the adapter gradients."""
    ours, ref, ref_layer = _peft_pair(torch.float32, base_kind)
    x = torch.randn(3, 7, 64)
    dy = torch.randn(3, 7, 96)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(x_ours)
    assert y.grad_fn.name() == "_FrozenBaseLoRABackward"  # the path under test
    y_ref = ref(x_ref)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **FP32_TOL)
    for name in ("lora_A", "lora_B"):
        want = getattr(ref_layer, name)["default"].weight.grad
        torch.testing.assert_close(getattr(ours, name).weight.grad, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base_kind", ["linear", "4bit"])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_adapter_in_bf16_is_autograds_path_up_to_one_rounding(base_kind, autocast, monkeypatch):
    """In bf16 (a bf16 model, or float32 under bf16 autocast) the fast path computes autograd's products; only
    x.grad differs, by the rounding of one sum (dx = dy @ W + dh @ A rounded once instead of twice)."""
    ours, _, _ = _peft_pair(torch.float32 if autocast else torch.bfloat16, base_kind)
    dtype = torch.float32 if autocast else torch.bfloat16
    x, dy = torch.randn(3, 7, 64, dtype=dtype), torch.randn(3, 7, 96, dtype=torch.bfloat16)

    def run():
        ours.zero_grad()
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ours(xg)
        y.backward(dy)
        return y.grad_fn.name(), y, xg.grad, ours.lora_A.weight.grad, ours.lora_B.weight.grad

    fused = run()
    monkeypatch.setattr(LoRALinear, "_fusable", lambda self, x: False)
    plain = run()
    assert fused[0] == "_FrozenBaseLoRABackward" != plain[0]
    for got, want in zip(fused[1:], plain[1:]):
        assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(fused[1], plain[1]) and torch.equal(fused[3], plain[3]) and torch.equal(fused[4], plain[4])
    torch.testing.assert_close(fused[2], plain[2], rtol=2**-7, atol=2**-7)  # one bf16 rounding


def test_fused_adapter_serves_only_what_it_can():
    """The fast path needs a frozen base and no active dropout; everything else takes autograd's path."""
    ours, _, _ = _peft_pair(torch.float32, "4bit")
    x = torch.randn(4, 64)
    assert ours(x).grad_fn.name() == "_FrozenBaseLoRABackward"
    with_dropout = LoRALinear(ours.base_layer, r=4, alpha=8, dropout=0.1)
    assert with_dropout.train()(x).grad_fn.name() != "_FrozenBaseLoRABackward"
    assert with_dropout.eval()(x).grad_fn.name() == "_FrozenBaseLoRABackward"  # dropout is off in eval
    trainable = LoRALinear(nn.Linear(64, 96), r=4, alpha=8)  # the base's own weight trains too
    assert trainable(x).grad_fn.name() != "_FrozenBaseLoRABackward"
    x_only = x.clone().requires_grad_()
    ours.lora_A.weight.requires_grad_(False)
    ours.lora_B.weight.requires_grad_(False)
    ours(x_only).sum().backward()  # gradient for x alone
    assert x_only.grad is not None and ours.lora_A.weight.grad is None


def test_quantize_model_and_only_lora_trains():
    model = _mlp()
    quantized = quantize_model(model, blocksize=128, quant_type="fp4", double_quant=False)
    assert quantized == ["fc1", "block.1"]
    assert type(model.lm_head) is nn.Linear  # the output head is skipped by default
    assert all(model.get_submodule(n).blocksize == 128 and model.get_submodule(n).quant_type == "fp4" for n in quantized)
    names = add_lora(model, r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    assert names == ["fc1", "block.1"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}.weight" for n in names for ab in ("lora_A", "lora_B")}
    model(torch.randn(4, 64)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert all(torch.count_nonzero(model.get_submodule(n).lora_B.weight.grad) > 0 for n in names)


@pytest.mark.parametrize("training", [True, False])
def test_add_lora_keeps_the_model_mode(training):
    """LoRA added to a model in eval mode must not switch dropout on (and in train mode it is on)."""
    model = _mlp().train(training)
    add_lora(model, r=4, alpha=8, dropout=0.5)
    _randomize_b(model)
    assert all(m.training == training for m in model.modules())
    x = torch.randn(8, 64)
    same = torch.equal(model(x), model(x))
    assert same != training  # eval: deterministic; train: dropout draws differ


def test_targets_by_suffix_and_regex():
    model = _mlp()
    assert add_lora(copy.deepcopy(model), 2, 2, target_modules=["1", "lm_head"]) == ["block.1", "lm_head"]
    assert add_lora(copy.deepcopy(model), 2, 2, target_modules=r"(fc\d|lm_head)") == ["fc1", "lm_head"]


def _adapted_mlp(base_kind: str):
    """_mlp() with LoRA (r=4, random B) on a 16-bit ("linear") or quantized ("4bit") base."""
    model = _mlp()
    if base_kind == "4bit":
        quantize_model(model)
    add_lora(model, r=4, alpha=8)
    _randomize_b(model)
    return model


@pytest.mark.parametrize("base_kind", ["linear", "4bit"])
def test_merge_then_unmerge_restores_exactly(base_kind):
    model = _adapted_mlp(base_kind)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(5, 64)
    y = model(x)
    if base_kind == "4bit":
        with pytest.warns(UserWarning, match="relative error"):
            merge_lora(model)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a 16-bit merge rounds once and says nothing
            merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    with pytest.raises(ValueError, match="already merged"):
        model.fc1.merge()
    unmerge_lora(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(x), y)
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)


@pytest.mark.parametrize("base_kind", ["linear", "4bit"])
def test_conversions_while_merged_reach_the_base_kept_for_unmerge(base_kind):
    """merge, cast the model, unmerge: the restored base is cast like the rest (it lives outside the module tree)."""
    model = _adapted_mlp(base_kind)
    cast = copy.deepcopy(model).to(torch.bfloat16)  # the same model cast without a merge in between
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 4-bit merge's requantization warning
        merge_lora(model)
    model.to(torch.bfloat16)
    unmerge_lora(model)
    after, want = model.state_dict(), cast.state_dict()
    assert set(after) == set(want)
    assert all(after[k].dtype == want[k].dtype and torch.equal(after[k], want[k]) for k in want)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(model(x), cast(x))


@pytest.mark.parametrize("bias_trains", [False, True])
@pytest.mark.parametrize("dequantize", [False, True])
def test_merging_a_4bit_base_keeps_the_bias_trainability(bias_trains, dequantize):
    model = _mlp()
    quantize_model(model)
    add_lora(model, r=4, alpha=8)  # freezes everything but the adapters
    model.fc1.base_layer.bias.requires_grad_(bias_trains)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the requantization warning
        merge_lora(model, dequantize=dequantize, unload=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == ({"fc1.bias"} if bias_trains else set())


def test_merge_dequantize_follows_a_cast_of_the_quantized_model():
    """Quantized from float32, then cast to bf16 (the bias follows, the packed weight cannot): the merged layer takes
    its bias' dtype and runs in the bf16 model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    quantize_model(model)
    model.to(torch.bfloat16)
    add_lora(model, r=4, alpha=8)
    _randomize_b(model)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    y = model(x)
    merge_lora(model, dequantize=True, unload=True)
    for layer in (model[0], model[2]):
        assert type(layer) is nn.Linear and layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    torch.testing.assert_close(model(x), y, rtol=2**-6, atol=2**-6)  # a few bf16 roundings apart


def test_all_linear_skips_multihead_attentions_out_proj():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj, so it cannot be wrapped: "all-linear"
    leaves it out, and naming it is refused before the model is touched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Linear(16, 4))
    x = torch.randn(2, 3, 16)
    y = copy.deepcopy(model).requires_grad_(False)(x)  # frozen, as after add_lora (attention picks its path by that)
    for targets in (["out_proj"], r".*_proj", ["linear1", "self_attn.out_proj"]):
        with pytest.raises(ValueError, match=r"selects \['0\.self_attn\.out_proj'\].*nn\.MultiheadAttention"):
            add_lora(model, r=2, alpha=4, target_modules=targets)
        assert all(p.requires_grad for p in model.parameters())
    assert add_lora(model, r=2, alpha=4, target_modules="all-linear") == ["0.linear1", "0.linear2", "1"]
    torch.testing.assert_close(model(x), y, **FP32_TOL)  # B = 0: the base output


def test_merge_dequantize_is_lossless_wrt_the_dequantized_base():
    model = _mlp()
    quantize_model(model, compute_dtype=torch.float32)  # the merged float32 layers compute in float32 too
    add_lora(model, r=8, alpha=16)
    _randomize_b(model)
    x = torch.randn(6, 64)
    y = model(x)
    merge_lora(model, dequantize=True, unload=True)
    assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in model.modules())
    assert model.fc1.weight.dtype == torch.float32 and not model.fc1.weight.requires_grad
    assert torch.allclose(model(x), y, **FP32_TOL)


def test_merge_dequantize_keeps_the_original_16bit_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, dtype=torch.bfloat16))
    quantize_model(model)
    add_lora(model, r=2, alpha=4)
    merge_lora(model, dequantize=True)
    assert isinstance(model[0].base_layer, nn.Linear) and model[0].base_layer.weight.dtype == torch.bfloat16


def test_merge_into_4bit_requantizes_and_reports_the_error():
    model = _mlp()
    quantize_model(model)
    add_lora(model, r=8, alpha=16)
    _randomize_b(model)
    x = torch.randn(6, 64)
    y = model(x)
    with pytest.warns(UserWarning, match=r"largest relative error (\d\.\d+|\d+e-\d+)") as record:
        merge_lora(model, unload=True)
    assert "fc1" in str(record[0].message) or "block.1" in str(record[0].message)
    assert isinstance(model.fc1, Linear4bit) and isinstance(model.block[1], Linear4bit)
    # NF4 keeps ~10% relative error per weight; the outputs stay within that of the unmerged model.
    rel = (model(x) - y).norm() / y.norm()
    assert 0 < rel < 0.1
    single = LoRALinear(Linear4bit(64, 64), r=2, alpha=4)
    with pytest.warns(UserWarning, match="relative error"):
        error = single.merge()
    assert 0 < error < 0.2


def test_autocast_runs_bf16_and_keeps_float32_adapters():
    model = _mlp()
    quantize_model(model)
    add_lora(model, r=4, alpha=8)
    _randomize_b(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.fc1(torch.randn(3, 64))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model.fc1.lora_A.weight.dtype == model.fc1.lora_A.weight.grad.dtype == torch.float32


def test_init_follows_peft():
    torch.manual_seed(0)
    kaiming = LoRALinear(nn.Linear(512, 64), r=8, alpha=16)
    bound = 1 / math.sqrt(512)
    assert kaiming.lora_A.weight.abs().max() <= bound and kaiming.lora_A.weight.std() > bound / 2
    gaussian = LoRALinear(nn.Linear(512, 64), r=8, alpha=16, init="gaussian")
    assert abs(gaussian.lora_A.weight.std().item() - 1 / 8) < 0.01
    assert torch.count_nonzero(gaussian.lora_B.weight) == 0
    assert LoRALinear(nn.Linear(8, 8), r=4, alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be a positive int, got 0"),
        (dict(r=-2), "r must be a positive int, got -2"),
        (dict(r=2.5), "r must be a positive int, got 2.5"),
        (dict(r=True), "r must be a positive int, got True"),
        (dict(alpha=0), "alpha must be a positive finite number, got 0"),
        (dict(alpha=-1.0), "alpha must be a positive finite number"),
        (dict(alpha=float("nan")), "alpha must be a positive finite number, got nan"),
        (dict(dropout=-0.1), r"dropout must be a number in \[0, 1\), got -0.1"),
        (dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
        (dict(init="xavier"), "init must be one of"),
    ],
)
def test_bad_lora_arguments(kwargs, match):
    args = dict(r=4, alpha=8, dropout=0.0) | kwargs
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        add_lora(model, **args)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was touched
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(4, 4), **args)


def test_add_lora_checks_every_argument_before_touching_the_model():
    model = _mlp()
    with pytest.raises(TypeError, match="use_rslora must be a bool, got 1"):
        add_lora(model, r=2, alpha=4, use_rslora=1)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_bad_targets_and_models():
    model = _mlp()
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no Linear layer.*\['1', 'fc1', 'lm_head'\]"):
        add_lora(model, 4, 8, target_modules=["fc1", "q_proj"])
    with pytest.raises(ValueError, match=r"selects no Linear layer.*\['1', 'fc1', 'lm_head'\]"):
        add_lora(model, 4, 8, target_modules=r"attn\..*")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        add_lora(model, 4, 8, target_modules="fc(")
    with pytest.raises(TypeError, match="target_modules must be"):
        add_lora(model, 4, 8, target_modules=3)
    with pytest.raises(TypeError, match="target_modules must be"):
        add_lora(model, 4, 8, target_modules=[])
    with pytest.raises(TypeError, match="must hold module names"):
        add_lora(model, 4, 8, target_modules=["fc1", 2])
    with pytest.raises(TypeError, match="base must be a Linear4bit or torch.nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(2, 2, 1), 2, 2)
    with pytest.raises(TypeError, match="model is itself a Linear"):
        add_lora(nn.Linear(4, 4), 2, 2)
    with pytest.raises(TypeError, match="unknown keyword arguments \\['bits'\\]"):
        quantize_model(_mlp(), bits=4)
    add_lora(model, 4, 8)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, 4, 8)
    with pytest.raises(ValueError, match="no LoRA layers to merge"):
        merge_lora(_mlp())
