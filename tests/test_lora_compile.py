"""torch.compile(fullgraph=True) of a model holding Linear4bit + LoRA: no graph breaks in our layers (matmul_4bit
is a torch custom op with a fake implementation), and the compiled model computes what eager does."""

import torch
from torch import nn

from nf4lora.lora import LoRALinear, add_lora, quantize_model


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False), nn.LayerNorm(64))
    quantize_model(model)
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
    x = torch.randn(2, 5, 64)

    torch._dynamo.reset()
    # fullgraph=True turns any graph break into an error; aot_eager also traces the backward through the op.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y_compiled = compiled(x)
    y_compiled.square().sum().backward()
    grads_compiled = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]

    # aot_eager runs the same ATen ops in the same order: equal up to float32 reassociation.
    assert torch.allclose(y_compiled, y, rtol=1e-5, atol=1e-6)
    assert len(grads) == 4
    for g_compiled, g in zip(grads_compiled, grads):
        assert torch.allclose(g_compiled, g, rtol=1e-4, atol=1e-6)
