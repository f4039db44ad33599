"""The public kernel entry points on the torch path (CPU): dequantize bit-identical to nf4.dequantize_4bit,
matmul_4bit and its gradients against dense F.linear, what backward saves, torch.compile without graph breaks,
backend selection and bad input. The Triton kernels themselves are tested in test_kernels_triton.py."""

import dataclasses
import importlib.metadata
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from nf4lora.kernels import backend_for, dequantize, matmul_4bit, matmul_4bit_grad_input
from nf4lora.kernels import torch_path
from nf4lora.kernels.dispatch import state_args
from nf4lora.nf4 import dequantize_4bit, quantize_4bit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("NF4LORA_BACKEND", "torch")


def bits(t):
    """The raw bits of a float tensor, so equality means bit-identical (and -0.0 != 0.0)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def quantized(shape, blocksize=64, quant_type="nf4", double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_4bit(torch.randn(shape, generator=g), blocksize, quant_type, double_quant)


# Awkward shapes: one element, odd sizes, partial last blocks, a tensor of many spans of the torch path.
SHAPES_AND_BLOCKSIZES = [
    ((1,), 64), ((7,), 32), ((33, 65), 128), ((300, 77), 256), ((1023,), 512), ((130, 130), 1024),
    ((5, 2049), 2048), ((3, 4097), 4096),
    # Many spans (decoded by several threads), and more blocks than one piece of block scales.
    ((torch_path.PIECES_PER_SPAN * torch_path._piece_elements(32) * 5 + 33,), 32),
]  # fmt: skip


@pytest.mark.parametrize("shape,blocksize", SHAPES_AND_BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_bit_identical_to_reference(shape, blocksize, quant_type, double_quant):
    packed, state = quantized(shape, blocksize, quant_type, double_quant)
    for dtype in DTYPES:
        ours = dequantize(packed, state, dtype)
        ref = dequantize_4bit(packed, state, dtype)
        assert ours.shape == ref.shape and ours.dtype == dtype
        assert torch.equal(bits(ours), bits(ref)), (shape, blocksize, quant_type, double_quant, dtype)
    assert dequantize(packed, state).dtype == state.dtype  # default: the original dtype


def test_dequantize_in_a_forked_child():
    """The torch path's worker threads do not survive fork(); a child (e.g. a DataLoader worker) decodes on its own
    thread (new threads there can trip torch's OpenMP pool assertion) and gets the same bits."""
    packed, state = quantized((torch_path.PIECES_PER_SPAN * torch_path._piece_elements(64) * 4,), 64)
    expected = dequantize_4bit(packed, state, torch.bfloat16)
    assert torch.equal(bits(dequantize(packed, state, torch.bfloat16)), bits(expected))  # the parent's threads
    pid = os.fork()
    if pid == 0:  # child: exit status 0 if it computed the same bits, 1 otherwise; never return into pytest
        ok = False
        try:
            # Compared in numpy: an OpenMP parallel region (torch.equal) would hang in a forked child of a
            # process that used OpenMP threads (a GNU OpenMP limitation, why DataLoader workers use 1 thread).
            y = dequantize(packed, state, torch.bfloat16)
            ok = bits(y).numpy().tobytes() == bits(expected).numpy().tobytes()
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid, "the forked child hung in dequantize"
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the forked child computed different values"


def test_code_tables_are_cached_by_their_bits():
    """The byte-pair table is cached per code table: a table differing only in the sign of a zero (FP4's code 8)
    or in one value gets its own, and each dequantizes bit-identically to the specification."""
    packed, state = quantized((33, 65), 32, "fp4")
    negative_zero = state.code.clone()
    negative_zero[8] = -0.0
    nudged = state.code.clone()
    nudged[3] = torch.nextafter(nudged[3], torch.tensor(2.0))
    for code in (state.code, negative_zero, nudged, state.code.clone()):
        variant = dataclasses.replace(state, code=code)
        for dtype in DTYPES:
            ours, ref = dequantize(packed, variant, dtype), dequantize_4bit(packed, variant, dtype)
            assert torch.equal(bits(ours), bits(ref)), (code, dtype)
    # the data holds code 8, so the two zero tables give different bits: confusing them would have failed above
    with_negative_zero = dequantize_4bit(packed, dataclasses.replace(state, code=negative_zero), torch.float32)
    assert (bits(with_negative_zero) == bits(torch.tensor(-0.0))).any()


class _CountingPool(ThreadPoolExecutor):
    """The torch path's thread pool, counting the ranges handed to it (so a test knows they were)."""

    submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


@pytest.fixture(params=["serial-openmp", "no-openmp-runtime"])
def three_threads(request, monkeypatch):
    """Three threads (on any machine) for any work, pieces of 4096 elements: small enough that the awkward shapes
    below span several ranges and pieces. Each range runs with one OpenMP thread (one piece per gather), or, where
    no OpenMP runtime is found, below the parallel grain in spans of three pieces (whose bytes take two copies).
    The pool counts its work."""
    pool = _CountingPool(2)
    monkeypatch.setattr(torch_path, "_pool", pool)
    monkeypatch.setattr(torch_path, "MIN_RANGE", 1)
    monkeypatch.setattr(torch_path, "ONE_THREAD_PIECE", 4097)
    monkeypatch.setattr(torch_path, "PARALLEL_GRAIN", 4097)
    monkeypatch.setattr(torch_path, "PIECES_PER_SPAN", 3)
    if request.param == "no-openmp-runtime":
        monkeypatch.setattr(torch_path, "_openmp_runtime", lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield pool
    torch.set_num_threads(threads)
    pool.shutdown()


@pytest.mark.parametrize("n,align", [(1, 1), (2, 1), (7, 3), (4096, 4096), (4097, 4096), (10000, 7), (12289, 4096)])
def test_ranges_on_threads_cover_every_element_once(three_threads, n, align):
    ranges = []
    torch_path._on_threads(n, align, lambda lo, hi: ranges.append((lo, hi)))
    ranges.sort()
    units = -(-n // align)
    assert len(ranges) == min(3, units)
    assert three_threads.submitted == len(ranges) - 1  # all but the caller's range went to the pool
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(lo < hi and lo % align == 0 for lo, hi in ranges)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous: no gap, no overlap
    lengths = [hi - lo for lo, hi in ranges]
    assert max(lengths) - min(lengths) < 2 * align  # balanced: whole units differ by one at most


def test_each_range_runs_on_one_openmp_thread_and_the_caller_keeps_its_count(three_threads):
    """Inside a range torch sees one thread (no call opens an OpenMP region, pieces are large); the caller's
    count is back after the call. Without an OpenMP runtime the ranges see torch's count and take small pieces."""
    seen = []
    torch_path._on_threads(3 * 4096, 64, lambda lo, hi: seen.append((torch.get_num_threads(), torch_path._pieces(64))))
    found = torch_path._openmp_runtime() is not None
    assert seen == [(1, (4096, 1)) if found else (3, (4096, 3))] * 3
    assert torch.get_num_threads() == 3


def test_the_openmp_runtime_is_found_where_torch_loads_one():
    """torch's Linux builds link libgomp: the ranges then run serially in large pieces. (Loaded here beside
    another libgomp, which bitsandbytes' and transformers' imports can bring, it is still torch's that is found.)"""
    import bitsandbytes  # noqa: F401  (its import loads the system libgomp too)

    assert (torch_path._openmp_runtime() is not None) == sys.platform.startswith("linux")


def test_short_work_stays_on_fewer_threads(three_threads, monkeypatch):
    monkeypatch.setattr(torch_path, "MIN_RANGE", 100)
    for n, expected in ((99, 1), (199, 1), (200, 2), (10000, 3)):
        ranges = []
        torch_path._on_threads(n, 1, lambda lo, hi: ranges.append((lo, hi)))
        assert len(ranges) == expected, n


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_on_three_threads_bit_identical(three_threads, quant_type, double_quant):
    """Every blocksize and awkward shape, cut into ranges, spans and pieces that end anywhere."""
    for shape, blocksize in SHAPES_AND_BLOCKSIZES[:-1] + [((257, 333), 32), ((1, 40961), 64)]:
        packed, state = quantized(shape, blocksize, quant_type, double_quant)
        for dtype in DTYPES:
            ours, ref = dequantize(packed, state, dtype), dequantize_4bit(packed, state, dtype)
            assert torch.equal(bits(ours), bits(ref)), (shape, blocksize, quant_type, double_quant, dtype)
    assert three_threads.submitted > 0


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_on_one_thread_in_large_pieces_bit_identical(one_thread, monkeypatch, double_quant):
    """Where torch runs one thread the pieces are up to ONE_THREAD_PIECE elements, one per gather: here 4096, so
    that the awkward shapes end pieces and the block scales' pieces anywhere."""
    monkeypatch.setattr(torch_path, "ONE_THREAD_PIECE", 4097)
    assert torch_path._pieces(64) == (4096, 1) and torch_path._pieces(4096) == (4096, 1)
    for shape, blocksize in SHAPES_AND_BLOCKSIZES[:-1] + [((257, 333), 32), ((1, 40961), 64)]:
        packed, state = quantized(shape, blocksize, "nf4", double_quant)
        for dtype in DTYPES:
            ours, ref = dequantize(packed, state, dtype), dequantize_4bit(packed, state, dtype)
            assert torch.equal(bits(ours), bits(ref)), (shape, blocksize, double_quant, dtype)


def test_dequantize_and_matmul_on_three_threads_under_inference_mode(three_threads):
    """Under torch.inference_mode() the output and the workspace are inference tensors, which torch lets only
    inference mode write: the pool's threads must decode in it too (they raised RuntimeError before). Then the
    same calls outside it, into the workspace made inside it."""
    packed, state = quantized((257, 333), 32, "nf4", True)
    g = torch.Generator().manual_seed(5)
    for inference in (True, False):
        for dtype in DTYPES:
            x = torch.randn(2, 333, generator=g).to(dtype)
            with torch.inference_mode(inference):
                ours, y = dequantize(packed, state, dtype), matmul_4bit(x, packed, state)
            ref = dequantize_4bit(packed, state, dtype)
            assert torch.equal(bits(ours), bits(ref)) and torch.equal(y, F.linear(x, ref)), (inference, dtype)
    assert three_threads.submitted > 0


def _vma_flags(address):
    """The VmFlags of the mapping holding `address`, from /proc/self/smaps (Linux)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and ":" not in line.split()[0]:
                lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_fresh_outputs_and_scratch_are_advised_to_use_huge_pages(monkeypatch):
    """A freshly dequantized 8 MiB weight and an 8 MiB workspace buffer ask Linux for transparent huge pages
    (VmFlags "hg") over their 2 MiB-aligned part; small tensors are left alone. The values are unchanged."""
    monkeypatch.setattr(torch_path, "_workspace", threading.local())
    packed, state = quantized((2048, 1024), 64)
    y = dequantize(packed, state, torch.float32)  # 8 MiB
    assert torch.equal(bits(y), bits(dequantize_4bit(packed, state, torch.float32)))
    small = torch_path._advise_huge_pages(torch.empty(1024))
    assert small.numel() == 1024
    if not sys.platform.startswith("linux"):
        assert torch_path._libc is None  # the advice is a no-op there
    elif os.path.exists("/sys/kernel/mm/transparent_hugepage"):
        huge = torch_path._HUGE_PAGE
        assert "hg" in _vma_flags(-(-y.data_ptr() // huge) * huge)  # the first 2 MiB-aligned address inside y
        weight = torch_path._scratch("weight", 8 << 20, y.device)
        assert "hg" in _vma_flags(-(-weight.data_ptr() // huge) * huge)


def dense_reference(x, packed, state, bias):
    """F.linear through the dequantized weight, in x's dtype, with autograd: the semantics matmul_4bit promises."""
    w = dequantize_4bit(packed, state, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_forward_and_gradients_match_dense(dtype, with_bias):
    packed, state = quantized((24, 40), blocksize=32, quant_type="fp4")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 40, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(24, generator=g).to(dtype).requires_grad_() if with_bias else None
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_() if with_bias else None

    y = matmul_4bit(x, packed, state, bias)
    y_ref = dense_reference(x_ref, packed, state, bias_ref)
    assert y.shape == (2, 5, 24) and y.dtype == dtype
    # The torch path is this very computation: equal, not just close.
    assert torch.equal(y, y_ref)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(x.grad, x_ref.grad)
    if with_bias:
        # Summed in another order than autograd's broadcasting backward: equal within dtype rounding.
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=tol, atol=tol)


def test_matmuls_share_one_workspace_and_results_do_not_alias_it(monkeypatch):
    """The matmuls dequantize into one reused per-thread buffer: it grows to the largest weight, every product
    equals the dense one, and no result is a view of the buffer (the next call overwrites it)."""
    monkeypatch.setattr(torch_path, "_workspace", threading.local())  # empty, whatever ran before in this thread
    small, large = quantized((24, 40), 32, "nf4", True, seed=2), quantized((48, 96), 64, "fp4", False, seed=3)
    g = torch.Generator().manual_seed(4)
    results = []
    for (packed, state), dtype in ((small, torch.bfloat16), (large, torch.float32), (small, torch.float16)):
        x = torch.randn(3, state.shape[1], generator=g).to(dtype)
        dy = torch.randn(3, state.shape[0], generator=g).to(dtype)
        args = state_args(packed, state)
        y, dx = torch_path.matmul(x, None, *args), torch_path.matmul_grad_input(dy, *args)
        w = dequantize_4bit(packed, state, dtype)
        buffer = torch_path._workspace.weight
        for t in (y, dx):
            assert t.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        results.append((y, dx, x @ w.T, dy @ w))
    assert buffer.numel() == 48 * 96 * 4  # the largest weight in the largest dtype
    for y, dx, y_ref, dx_ref in results:  # still equal after later calls reused the buffer
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_bias_in_another_dtype_gets_its_gradient_in_that_dtype():
    packed, state = quantized((8, 16))
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float32, requires_grad=True)
    matmul_4bit(x, packed, state, bias).float().sum().backward()
    assert bias.grad.dtype == torch.float32
    torch.testing.assert_close(bias.grad, torch.full((8,), 3.0))


def test_backward_does_not_save_x():
    """The frozen weight needs no gradient, so x must not be kept: only the packed weight and its constants."""
    packed, state = quantized((24, 40))
    x = torch.randn(6, 40, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = matmul_4bit(x, packed, state, bias)
    assert saved, "backward saves the packed weight: the hook must have seen it"
    assert any(t is packed for t in saved)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    assert all(t.dtype != x.dtype or t.numel() != x.numel() for t in saved)
    y.sum().backward()
    assert x.grad is not None and bias.grad is not None


def test_no_gradient_for_the_frozen_weight():
    packed, state = quantized((8, 16))
    x = torch.randn(2, 16, requires_grad=True)
    y = matmul_4bit(x, packed, state)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    assert grad.shape == x.shape
    assert not packed.requires_grad and packed.grad is None


class _TinyQLoRA(torch.nn.Module):
    """A 4-bit frozen linear layer with a LoRA pair and a dense head: what Linear4bit + LoRA reduce to."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.packed, self.state = quantized((24, 40), blocksize=32, double_quant=True)
        self.bias = torch.nn.Parameter(torch.randn(24, generator=g))
        self.lora_a = torch.nn.Parameter(torch.randn(4, 40, generator=g) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(24, 4, generator=g) * 0.1)
        self.head = torch.nn.Linear(24, 5)

    def forward(self, x):
        h = matmul_4bit(x, self.packed, self.state, self.bias) + (x @ self.lora_a.T) @ self.lora_b.T
        return self.head(torch.nn.functional.gelu(h))


def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True fails on any graph break, so this proves the custom ops keep matmul_4bit in the graph."""
    torch._dynamo.reset()
    model = _TinyQLoRA()
    x = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(4))

    def run(fn):
        model.zero_grad()
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.square().sum().backward()
        return y.detach(), xg.grad, [p.grad.clone() for p in model.parameters()]

    eager = run(model)
    compiled = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-6)
    for got, want in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("NF4LORA_BACKEND", "auto")
    assert backend_for(cpu) == "torch"
    assert backend_for(torch.zeros(1, device="meta")) == "torch"
    monkeypatch.setenv("NF4LORA_BACKEND", "triton")
    assert backend_for(cpu) == "triton"
    monkeypatch.setenv("NF4LORA_BACKEND", "torch")
    assert backend_for(cpu) == "torch"
    monkeypatch.delenv("NF4LORA_BACKEND")
    assert backend_for(cpu) == "torch"
    monkeypatch.setenv("NF4LORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NF4LORA_BACKEND must be one of .*'cuda'"):
        backend_for(cpu)


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_input_device_mix():
    packed, state = quantized((8, 16))
    with pytest.raises(ValueError, match="x is on meta but packed is on cpu"):
        matmul_4bit(torch.randn(2, 16, device="meta"), packed, state)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        matmul_4bit(torch.randn(2, 16), packed, state, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="packed is on meta but the state is on cpu"):
        dequantize(packed.to("meta"), state)


def test_bad_input_non_contiguous_packed():
    packed, state = quantized((8, 16))
    strided = torch.empty(packed.numel(), 2, dtype=torch.uint8)[:, 0].view(-1, 1)
    strided.copy_(packed)
    assert not strided.is_contiguous()
    with pytest.raises(ValueError, match=r"packed must be contiguous .*strides"):
        matmul_4bit(torch.randn(2, 16), strided, state)
    with pytest.raises(ValueError, match="packed must be contiguous"):
        dequantize(strided, state)


def test_non_contiguous_x_is_supported():
    packed, state = quantized((8, 16))
    x = torch.randn(16, 3).T  # (3, 16), strides (1, 3)
    assert not x.is_contiguous()
    # BLAS may sum a transposed operand in another order: equal within float32 rounding.
    torch.testing.assert_close(matmul_4bit(x, packed, state), dense_reference(x.contiguous(), packed, state, None))


def test_bad_input_dtypes():
    packed, state = quantized((8, 16))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.float64"):
        matmul_4bit(torch.randn(2, 16, dtype=torch.float64), packed, state)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        matmul_4bit(torch.ones(2, 16, dtype=torch.long), packed, state)
    with pytest.raises(TypeError, match="bias must be float32, float16 or bfloat16, got torch.int32"):
        matmul_4bit(torch.randn(2, 16), packed, state, torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="packed must be uint8"):
        matmul_4bit(torch.randn(2, 16), packed.to(torch.int8), state)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16, got torch.float64"):
        dequantize(packed, state, torch.float64)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        matmul_4bit([[1.0] * 16], packed, state)
    with pytest.raises(TypeError, match="state must be a nf4lora.nf4.QuantState, got dict"):
        matmul_4bit(torch.randn(2, 16), packed, {"shape": (8, 16)})


def test_bad_input_shapes():
    packed, state = quantized((8, 16))
    with pytest.raises(ValueError, match=r"x has shape \(2, 15\) but the weight is 8x16.*in_features=16"):
        matmul_4bit(torch.randn(2, 15), packed, state)
    with pytest.raises(ValueError, match=r"x has shape \(\) but the weight is 8x16"):
        matmul_4bit(torch.tensor(1.0), packed, state)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\) for a 8x16 weight, got \(16,\)"):
        matmul_4bit(torch.randn(2, 16), packed, state, torch.randn(16))
    other_packed, other_state = quantized((8, 18))
    with pytest.raises(ValueError, match="packed data and state do not match"):
        matmul_4bit(torch.randn(2, 16), other_packed, state)
    flat_packed, flat_state = quantized((128,))
    with pytest.raises(ValueError, match=r"state must describe a 2-D weight .* got shape \(128,\)"):
        matmul_4bit(torch.randn(2, 128), flat_packed, flat_state)


def test_grad_input_entry_point_matches_autograd_and_checks_its_input():
    """kernels.matmul_4bit_grad_input (for hand-written backwards) is dy @ W, exactly what matmul_4bit's
    backward gives x, and checks dy as matmul_4bit checks x."""
    packed, state = quantized((8, 16), blocksize=32, double_quant=True)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(3, 8, dtype=torch.bfloat16)
    matmul_4bit(x, packed, state).backward(dy)
    assert torch.equal(matmul_4bit_grad_input(dy, packed, state), x.grad)
    with pytest.raises(ValueError, match=r"dy has shape \(3, 16\) but the weight is 8x16.*out_features=8"):
        matmul_4bit_grad_input(torch.randn(3, 16), packed, state)
    with pytest.raises(TypeError, match="dy must be float32, float16 or bfloat16"):
        matmul_4bit_grad_input(torch.ones(3, 8, dtype=torch.int32), packed, state)
    with pytest.raises(ValueError, match="dy is on meta but packed is on cpu"):
        matmul_4bit_grad_input(torch.randn(3, 8, device="meta"), packed, state)


def test_kernels_runs_only_as_nf4lora_kernels():
    """With the checkout's root on sys.path (`python -c` or `python -m pytest` run there), kernels/ is also a
    top-level package "kernels", which bitsandbytes and transformers both import (Hugging Face's package of that
    name; transformers >= 5.25 requires it). That ran nf4lora's kernels a second time, and registering the
    nf4lora:: custom ops again freed the first registration (torch.compile then crashed now and then in
    test_torch_compile_fullgraph_matches_eager); with Hugging Face's package installed, transformers failed to
    import from it. Under the foreign name the name must go to the installed package, or stay an empty module."""
    code = "\n".join([
        "import sys, torch, nf4lora.kernels",
        "import kernels, bitsandbytes, transformers.integrations.hub_kernels",
        "print('top-level kernels file:', getattr(kernels, '__file__', None))",
        "print('top-level kernels names:', sorted(n for n in vars(kernels) if not n.startswith('_')))",
        "print('stray:', sorted(m for m, mod in sys.modules.items() if m == 'kernels' or m.startswith('kernels.')",
        "                        if (getattr(mod, '__file__', None) or '').startswith(sys.argv[1])))",
        "from nf4lora.kernels import matmul_4bit",  # the first registration still works
        "print(torch.ops.nf4lora.matmul_4bit.default._schema.name)",
    ])  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = os.path.join(root, "kernels") + os.sep  # the checkout's folder (a venv may live inside the root too)
    proc = subprocess.run([sys.executable, "-c", code, ours], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stray: []" in proc.stdout and "nf4lora::matmul_4bit" in proc.stdout
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:  # the name went to Hugging Face's package, found beyond the checkout
        assert "top-level kernels file: " + ours not in proc.stdout and "get_kernel" in proc.stdout
    else:
        assert "top-level kernels names: []" in proc.stdout


def test_autocast_output_dtype_is_the_same_eager_and_compiled():
    """Under autocast, float32 x comes out in the autocast dtype as from F.linear, also through the custom op
    torch.compile traces (which autocast does not reach: dispatch casts x first)."""
    packed, state = quantized((16, 64))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = matmul_4bit(x, packed, state)
        compiled = torch.compile(lambda t: matmul_4bit(t, packed, state), fullgraph=True, backend="aot_eager")(x)
    assert eager.dtype == compiled.dtype == torch.bfloat16
    assert torch.equal(eager, compiled)
