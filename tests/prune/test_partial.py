"""A partial prune is never silent: attention modules without an adapter are named, with their share of the MACs,
before any search; with nothing prunable it is the one-line error."""
from __future__ import annotations

import pytest
import timm
from torch import Tensor, nn

from amap.errors import ConfigError
from amap.macs import count_macs
from amap.prune.pruner import Pruner


class OtherAttention(nn.Module):
    """An attention type AMAP has no adapter for (sequence-first ``nn.MultiheadAttention`` inside)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        x = x.transpose(0, 1)
        return self.mha(x, x, x, need_weights=False)[0].transpose(0, 1)


def _vit() -> nn.Module:
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=10).eval()


def test_unadapted_attention_is_named_with_its_share_of_the_macs(caplog):
    model = _vit()
    model.blocks[1].attn = OtherAttention(192, 3)
    share = count_macs(model, (3, 32, 32)).macs_under('blocks.1.attn') / count_macs(model, (3, 32, 32)).total
    with caplog.at_level('WARNING'):
        pruner = Pruner(model, (3, 32, 32))
    assert [a.name for a in pruner.adapters] == ['blocks.0.attn', 'blocks.0.mlp', 'blocks.1.mlp']
    assert '1 x OtherAttention (blocks.1.attn)' in caplog.text
    assert f'{100 * share:.1f}% of the MACs' in caplog.text and share > 0.1


def test_fully_supported_models_say_nothing(caplog):
    with caplog.at_level('WARNING'):
        Pruner(_vit(), (3, 32, 32))
    assert 'cannot prune' not in caplog.text


def test_nothing_prunable_is_the_one_line_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ConfigError, match='has no module AMAP knows how to prune'):
        Pruner(model, (3, 32, 32))
