"""PagedAdamW against torch.optim.AdamW, its state dict, and (GPU) where its state lives."""

import pytest
import torch

from nf4lora.train.optim import PagedAdamW

SHAPES = [(7,), (16, 33), (3, 5, 2), (1,), (64, 17)]
HYPER = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
]


def _params(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in SHAPES]


def _run(opt_cls, params, steps, seed, **hyper):
    opt = opt_cls(params, **hyper)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()
    return opt


@pytest.mark.parametrize("hyper", HYPER)
def test_matches_torch_adamw_over_20_steps(hyper):
    ours, ref = _params(0), _params(0)
    _run(PagedAdamW, ours, 20, 0, **hyper)
    _run(torch.optim.AdamW, ref, 20, 0, **hyper)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # fp32 state and params


def test_state_dict_round_trip_and_continuation():
    hyper = HYPER[1]
    params = _params(1)
    opt = _run(PagedAdamW, params, 5, 1, **hyper)
    sd = opt.state_dict()
    restored_params = [p.detach().clone().requires_grad_() for p in params]
    restored = PagedAdamW(restored_params, lr=0.5)  # hyperparameters come from the state dict
    restored.load_state_dict(sd)
    assert restored.param_groups[0]["lr"] == hyper["lr"]
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored.state[restored_params[i]][key], opt.state[p][key])
            assert restored.state[restored_params[i]][key].device.type == "cpu"
    # Both continue identically.
    for opt_, ps in ((opt, params), (restored, restored_params)):
        g = torch.Generator().manual_seed(9)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt_.step()
    for a, b in zip(params, restored_params):
        assert torch.equal(a, b)


def test_loads_torch_adamw_state_dict():
    hyper = HYPER[1]
    ref_params, params = _params(2), _params(2)
    ref = _run(torch.optim.AdamW, ref_params, 4, 2, **hyper)
    opt = PagedAdamW(params, **hyper)
    opt.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p, r in zip(params, ref_params):
            p.copy_(r)
    for opt_, ps in ((opt, params), (ref, ref_params)):
        g = torch.Generator().manual_seed(3)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt_.step()
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bf16_params_update_in_fp32_state():
    p = torch.randn(8, 8).bfloat16().requires_grad_()
    opt = PagedAdamW([p], lr=1e-2)
    p.grad = torch.randn(8, 8).bfloat16()
    before = p.detach().clone()
    opt.step()
    assert p.dtype == torch.bfloat16 and not torch.equal(p, before)
    assert opt.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=float("nan")), "eps"),
     (dict(weight_decay=-0.1), "weight_decay"), (dict(page_numel=0), "page_numel")],
)  # fmt: skip
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW([torch.zeros(2, requires_grad=True)], **kwargs)


def test_load_rejects_mismatched_state():
    opt = _run(PagedAdamW, _params(3), 1, 3)
    other = PagedAdamW([torch.zeros(5, requires_grad=True)])
    with pytest.raises(ValueError, match="params"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_adamw_and_keeps_no_device_state():
    hyper = HYPER[1]
    page = 1000
    shapes = [(300, 70), (4096,), (5, 7)]  # 21000 and 4096 elements: several pages, a partial last page
    g = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=g) for s in shapes]
    ours = [t.cuda().requires_grad_() for t in init]
    ref = [t.cuda().requires_grad_() for t in init]
    opt = PagedAdamW(ours, page_numel=page, **hyper)
    ref_opt = torch.optim.AdamW(ref, **hyper)

    # Peak device memory of a step: two page slots of (exp_avg, exp_avg_sq), (2, page) fp32 each, plus the two
    # page-sized fp32 temporaries of _adamw_update (sqrt(exp_avg_sq) and its quotient), each allocation rounded up
    # to the caching allocator's 512 bytes: 24576 bytes, against 168000 for the state of the (300, 70) parameter.
    def allocated(nbytes):
        return -(-nbytes // 512) * 512

    peak_bound = 2 * allocated(2 * page * 4) + 2 * allocated(page * 4)
    for step in range(20):
        grads = [torch.randn(s, generator=g).cuda() for s in shapes]
        for p, r, gr in zip(ours, ref, grads):
            p.grad, r.grad = gr.clone(), gr.clone()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before  # the page buffers are released when step() returns
        assert torch.cuda.max_memory_allocated() - before <= peak_bound, (torch.cuda.max_memory_allocated(), before)
        ref_opt.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-5)  # fp32; CUDA sqrt/div rounding differs slightly
    for state in opt.state.values():
        assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].is_pinned()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_passes_over_an_empty_shard():
    """Under FSDP2 a rank at or past dim 0 of a parameter holds an empty shard (lora_A is (r, in): r < world size);
    the paged update used to fail on it (range() with a page of 0 elements)."""
    empty = torch.zeros(0, 64, device="cuda", requires_grad=True)
    full = torch.ones(3, device="cuda", requires_grad=True)
    empty.grad, full.grad = torch.zeros_like(empty), torch.ones_like(full)
    opt = PagedAdamW([empty, full], lr=0.1)
    opt.step()
    assert opt.state[empty]["step"].item() == 1 and opt.state[empty]["exp_avg"].shape == (0, 64)
    assert bool((full < 1).all())  # the other parameter was updated
