"""Gates scale weights, not activations: same function and same gradients as scaling the activations."""
from __future__ import annotations

import copy

import torch
from conftest import build
from timm.layers import Attention, Mlp

from amap.prune.pruner import Pruner


def _randomise(pruner: Pruner) -> None:
    g = torch.Generator().manual_seed(3)
    for ind in pruner.indicators.values():
        ind.m.data.copy_(torch.rand(ind.m.shape, generator=g))
        ind.reweight.data.copy_(0.5 + torch.rand(ind.m.shape, generator=g))


def _activation_gates(model: torch.nn.Module, pruner: Pruner) -> None:
    """The textbook gates, written out here independently: multiply q/k outputs and proj/fc2 inputs."""
    ind = {key.replace('__', '.'): i for key, i in pruner.indicators.items()}
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            qk, v = ind[f'{name}.qk'], ind[f'{name}.v']
            n = m.num_heads * m.head_dim

            def gate_qkv(mod, args, out, qk=qk, n=n):
                mask = qk.mask().flatten()
                return torch.cat([out[..., :n] * mask * qk.reweight.flatten(), out[..., n:2 * n] * mask,
                                  out[..., 2 * n:]], dim=-1)

            m.qkv.register_forward_hook(gate_qkv)
            m.proj.register_forward_pre_hook(lambda mod, args, v=v: (args[0] * v.channel_scale().flatten(),))
        elif isinstance(m, Mlp):
            mlp = ind[f'{name}.mlp']
            m.fc2.register_forward_pre_hook(lambda mod, args, mlp=mlp: (args[0] * mlp.channel_scale().flatten(),))


def _grads(pruner: Pruner, model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list, list]:
    pruner.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    out = model(images)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return (out.detach(), [p.grad.clone() for p in pruner.parameters()],
            [p.grad.clone() for p in model.parameters()])


def test_weight_gates_equal_activation_gates_in_value_and_gradient(images):
    model = build('timm_deit').train()
    reference = copy.deepcopy(model)
    pruner = Pruner(model, (3, 32, 32))
    _randomise(pruner)
    out, ind_grads, w_grads = _grads(pruner, model, images)
    pruner.detach()
    assert not any('forward' in m.__dict__ for m in model.modules())  # detach removes the weight gates
    _activation_gates(reference, pruner)
    ref_out, ref_ind_grads, ref_w_grads = _grads(pruner, reference, images)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in ind_grads)
    for got, want in zip(ind_grads + w_grads, ref_ind_grads + ref_w_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_recorder_sees_ungated_activations(images):
    """Calibration records what the gate receives, before its factor (as the activation gates did)."""
    model = build('timm_deit')
    pruner = Pruner(model, (3, 32, 32))
    for ind in pruner.indicators.values():
        ind.m.data.zero_()  # every channel gated off: gated activations would be all zero
    seen: dict[str, torch.Tensor] = {}
    for a in pruner.adapters:
        a.recorder = lambda key, x, role, first: seen.setdefault(f'{key}.{role}', x)
    with torch.no_grad():
        model(images)
    attn = model.blocks[0].attn
    with torch.no_grad():
        x = model.blocks[0].norm1(model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images)))))
        qkv = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)  # the layer itself is gated
    n = attn.num_heads * attn.head_dim
    torch.testing.assert_close(seen['blocks.0.attn.qk.q'], qkv[..., :n])
    torch.testing.assert_close(seen['blocks.0.attn.qk.k'], qkv[..., n:2 * n])
    assert {'blocks.0.mlp.mlp.mlp', 'blocks.1.attn.v.v'} <= set(seen)
    assert all(x.abs().sum() > 0 for x in seen.values())
