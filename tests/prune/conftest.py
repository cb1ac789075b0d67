"""Small models of every attention type the engine supports, for fast CPU tests."""
from __future__ import annotations

import pytest
import timm
import torch

import amap

# name -> builder; every model takes 32x32 inputs and has 10 classes
BUILDERS = {
    'timm_deit': lambda: timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=10),
    'timm_swin': lambda: timm.create_model('swin_tiny_patch4_window7_224', img_size=32, patch_size=2, window_size=4,
                                           embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=10),
    'flatten_deit': lambda: timm.create_model('flatten_deit_nano', num_classes=10),
    'flatten_swin': lambda: timm.create_model('flatten_swin_nano', num_classes=10),
    'flatten_pvt_v2': lambda: amap.models.from_official(
        'PyramidVisionTransformerV2', img_size=32, patch_size=4, embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4],
        depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], num_classes=10, attn_type='LLSS', sr_ratios=[4, 2, 1, 1],
        la_sr_ratios='2111'),
    'flatten_cswin': lambda: amap.models.from_official(
        'CSWinTransformer', img_size=32, embed_dim=16, depth=[1, 1, 1, 1], num_heads=[2, 2, 4, 4],
        split_size=[1, 2, 2, 1], la_split_size='8-4-2-1', num_classes=10),
}


def build(name: str, seed: int = 0, builders: dict | None = None) -> torch.nn.Module:
    """A small model (of ``builders``, default :data:`BUILDERS`) with its zero-initialised FLatten/Swin parameters
    perturbed so that they matter."""
    torch.manual_seed(seed)
    model = (builders or BUILDERS)[name]().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('.scale', 'positional_encoding', 'relative_position_bias_table')):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(params=sorted(BUILDERS))
def model_name(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
