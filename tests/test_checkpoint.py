"""amap.checkpoint: safe reading of official FLatten / timm / safetensors checkpoints and its errors."""
from __future__ import annotations

import argparse
import builtins
import pickle
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import amap
from amap.checkpoint import LoadResult, load_checkpoint, read_state_dict
from amap.errors import AmapError, CheckpointError


def _vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=10).eval()


def _swin(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('swin_tiny_patch4_window7_224', img_size=32, patch_size=2, window_size=4,
                             embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), num_classes=10).eval()


def _flatten(name: str):
    def make(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return timm.create_model(name, num_classes=10).eval()
    return make


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def _differ(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _write(fmt: str, sd: dict[str, torch.Tensor], path: Path) -> Path:
    sd = {k: v.clone() for k, v in sd.items()}
    if fmt == 'official':  # what the official save_checkpoint writes, minus the config (tested separately)
        torch.save({'model': sd, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 299,
                    'max_accuracy': 82.1}, path)
    elif fmt == 'bare':
        torch.save(sd, path)
    elif fmt == 'legacy_bare':  # torch's pre-1.6 non-zip serialization
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == 'safetensors':
        save_file(sd, str(path))
    elif fmt == 'ddp':
        torch.save({'model': {f'module.{k}': v for k, v in sd.items()}}, path)
    elif fmt == 'timm_train':  # timm's train.py: 'state_dict' + 'args' namespace + EMA
        torch.save({'epoch': 3, 'arch': 'x', 'state_dict': sd, 'args': argparse.Namespace(lr=1e-3, model='x'),
                    'state_dict_ema': {k: torch.zeros_like(v) for k, v in sd.items()}}, path)
    elif fmt == 'compiled':
        torch.save({'state_dict': {f'_orig_mod.{k}': v for k, v in sd.items()}}, path)
    else:
        raise AssertionError(fmt)
    return path


ROUND_TRIPS = {
    'official': ('ckpt.pth', 'model'),
    'bare': ('weights.pt', None),
    'legacy_bare': ('weights.bin', None),
    'safetensors': ('model.safetensors', None),
    'ddp': ('ddp.pth', 'model'),
    'timm_train': ('last.pth.tar', 'state_dict'),
    'compiled': ('compiled.pth', 'state_dict'),
}


@pytest.mark.parametrize('fmt', list(ROUND_TRIPS))
@pytest.mark.parametrize('make', [_vit, _swin, _flatten('flatten_swin_nano'), _flatten('flatten_deit_nano')],
                         ids=['vit', 'swin', 'flatten_swin_nano', 'flatten_deit_nano'])
def test_round_trip(tmp_path, fmt, make):
    src, dst = make(0), make(1)
    assert _differ(src, dst)
    name, entry = ROUND_TRIPS[fmt]
    path = _write(fmt, src.state_dict(), tmp_path / name)
    result = load_checkpoint(dst, path)
    assert isinstance(result, LoadResult)
    assert (result.missing_keys, result.unexpected_keys, result.shape_mismatches) == ([], [], [])
    assert result.entry == entry
    _assert_same_weights(src, dst)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_public_api_and_read_state_dict(tmp_path):
    src = _vit(0)
    path = _write('ddp', src.state_dict(), tmp_path / 'a.pth')
    sd = read_state_dict(path)
    assert sd.keys() == src.state_dict().keys()  # 'module.' stripped
    assert amap.load_checkpoint is load_checkpoint
    dst = _vit(1)
    amap.load_checkpoint(dst, str(path))  # str paths too
    _assert_same_weights(src, dst)


def test_explicit_entry_picks_the_ema_weights(tmp_path):
    model, ema = _vit(0), _vit(2)
    torch.save({'model': model.state_dict(), 'model_ema': {f'module.{k}': v for k, v in ema.state_dict().items()}},
               tmp_path / 'ema.pth')
    dst = _vit(1)
    assert load_checkpoint(dst, tmp_path / 'ema.pth', entry='model_ema').entry == 'model_ema'
    _assert_same_weights(ema, dst)
    assert load_checkpoint(dst, tmp_path / 'ema.pth').entry == 'model'  # 'model' is preferred by default
    _assert_same_weights(model, dst)
    with pytest.raises(CheckpointError, match=r"ema\.pth has no entry 'ema'; its entries are 'model', 'model_ema'"):
        load_checkpoint(dst, tmp_path / 'ema.pth', entry='ema')


_FAKE_YACS = '''
class CfgNode(dict):
    def __init__(self, init_dict=None, new_allowed=False):
        super().__init__(init_dict or {})
        self.__dict__['__immutable__'] = False
        self.__dict__['__deprecated_keys__'] = set()
        self.__dict__['__renamed_keys__'] = {}
        self.__dict__['__new_allowed__'] = new_allowed

    def __reduce_ex__(self, protocol):
        return super().__reduce_ex__(protocol)
'''


def test_official_training_checkpoint_with_yacs_config(tmp_path, monkeypatch):
    """The official save_checkpoint stores the yacs config object; it must not block loading (nor run yacs code)."""
    pkg = tmp_path / 'site' / 'yacs'
    pkg.mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'config.py').write_text(_FAKE_YACS)
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    from yacs.config import CfgNode  # the fake one above, as training would have had it

    cfg = CfgNode({'MODEL': CfgNode({'TYPE': 'flatten_swin', 'LA': CfgNode({'ATTN_TYPE': 'LLSS'})}),
                   'DATA': CfgNode({'IMG_SIZE': 224})})
    src = _vit(0)
    torch.save({'model': src.state_dict(), 'optimizer': {}, 'lr_scheduler': {}, 'max_accuracy': 82.1, 'epoch': 299,
                'config': cfg}, tmp_path / 'ckpt_epoch_299.pth')
    for mod in [m for m in sys.modules if m == 'yacs' or m.startswith('yacs.')]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, 'path', [p for p in sys.path if p != str(tmp_path / 'site')])

    dst = _vit(1)
    assert load_checkpoint(dst, tmp_path / 'ckpt_epoch_299.pth').entry == 'model'
    _assert_same_weights(src, dst)
    assert 'yacs' not in sys.modules  # the config was read as plain data, not through the class


def test_missing_file(tmp_path):
    path = tmp_path / 'nowhere' / 'flatten_swin_t.pth'
    with pytest.raises(CheckpointError, match=r'flatten_swin_t\.pth does not exist; check the path'):
        load_checkpoint(_vit(0), path)
    with pytest.raises(CheckpointError, match='is not a file'):
        read_state_dict(tmp_path)


@pytest.mark.parametrize('fmt,name', [('official', 'c.pth'), ('legacy_bare', 'c.pth'),
                                      ('safetensors', 'c.safetensors')])
@pytest.mark.parametrize('keep', [0.5, 0.98, 16])
def test_truncated_file(tmp_path, fmt, name, keep):
    path = _write(fmt, _vit(0).state_dict(), tmp_path / name)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match=rf'{name} is truncated or corrupt \(.+\); copy or download it again'):
        load_checkpoint(_vit(1), path)


def test_empty_and_garbage_files(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'empty\.pth is empty \(0 bytes\)'):
        read_state_dict(tmp_path / 'empty.pth')
    (tmp_path / 'page.pth').write_bytes(b'<html><body>404 Not Found</body></html>\n' * 20)
    with pytest.raises(CheckpointError, match=r'page\.pth is truncated or corrupt'):
        read_state_dict(tmp_path / 'page.pth')


def test_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / 't.pth')
    with pytest.raises(CheckpointError, match=r't\.pth holds a Tensor, not a state dict; save model\.state_dict\(\)'):
        read_state_dict(tmp_path / 't.pth')
    torch.save({'epoch': 3, 'optimizer': {}}, tmp_path / 'opt.pth')
    with pytest.raises(CheckpointError, match=r"opt\.pth has no weights entry .* it has 'epoch', 'optimizer'"):
        read_state_dict(tmp_path / 'opt.pth')


def test_other_architecture_lists_mismatching_keys(tmp_path):
    path = _write('official', _swin(0).state_dict(), tmp_path / 'swin.pth')
    vit = _vit(1)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(vit, path)
    msg = str(info.value)
    assert '\n' not in msg
    n_missing = len([k for k in vit.state_dict() if k not in _swin(0).state_dict()])
    assert re.search(rf'swin\.pth does not fit VisionTransformer: {n_missing} missing keys \(cls_token, pos_embed, '
                     r'blocks\.0\.norm1\.weight, \.\.\.\), \d+ unexpected \(patch_embed\.norm\.weight, '
                     r'.*\d+ shape mismatches \(patch_embed\.proj\.weight: checkpoint \[16, 3, 2, 2\] vs model '
                     r'\[192, 3, 4, 4\].*another architecture', msg), msg
    for k, v in vit.state_dict().items():  # nothing half-loaded
        assert torch.equal(v, before[k]), k


def test_non_strict_loads_what_fits_and_reports_the_rest(tmp_path):
    src, dst = _vit(0), _vit(1)
    sd = src.state_dict()
    sd.pop('head.weight')
    sd['head.bias'] = torch.zeros(7)  # another number of classes
    sd['extra.weight'] = torch.zeros(1)
    path = _write('official', sd, tmp_path / 'ft.pth')
    with pytest.raises(CheckpointError, match=r"1 missing keys \(head\.weight\), 1 unexpected \(extra\.weight\), "
                                              r"1 shape mismatches \(head\.bias: checkpoint \[7\] vs model \[10\]\)"):
        load_checkpoint(dst, path)
    head_w, head_b = dst.head.weight.clone(), dst.head.bias.clone()
    result = load_checkpoint(dst, path, strict=False)
    assert result.missing_keys == ['head.weight']
    assert result.unexpected_keys == ['extra.weight']
    assert result.shape_mismatches == [('head.bias', (7,), (10,))]
    assert torch.equal(dst.head.weight, head_w) and torch.equal(dst.head.bias, head_b)
    torch.testing.assert_close(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight, rtol=0, atol=0)

    torch.save({'model': {'foo': torch.zeros(1)}}, tmp_path / 'none.pth')
    with pytest.raises(CheckpointError, match=r'does not fit VisionTransformer: .*\(no key fits at all\)'):
        load_checkpoint(dst, tmp_path / 'none.pth', strict=False)


def test_original_swin_layout_loads_into_timm_swin(tmp_path):
    """Original Microsoft Swin checkpoints: downsample at the end of a stage, persistent index/mask buffers."""
    src, dst = _swin(0), _swin(1)
    sd = {}
    for k, v in src.state_dict().items():
        k = re.sub(r'layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', k)
        sd[k.replace('head.fc.', 'head.')] = v
    sd['layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(16, 16, dtype=torch.long)
    path = _write('official', sd, tmp_path / 'swin_orig.pth')
    result = load_checkpoint(dst, path)
    assert result.ignored_keys == ['layers.0.blocks.0.attn.relative_position_index']  # regenerated by the model
    _assert_same_weights(src, dst)


class _Payload:
    """Unpickling this calls builtins.open(marker, 'w'), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, 'w')


@pytest.mark.parametrize('how', ['torch_zip', 'torch_legacy', 'pickle_p2', 'pickle_p4', 'inside_state_dict'])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / 'PWNED'
    payload = _Payload(marker)
    sd = _vit(0).state_dict()
    path = tmp_path / 'flatten_swin_tiny.pth'
    if how == 'torch_zip':
        torch.save({'model': sd, 'config': payload}, path)
    elif how == 'torch_legacy':
        torch.save({'model': sd, 'config': payload}, path, _use_new_zipfile_serialization=False)
    elif how == 'inside_state_dict':
        torch.save({'model': {**sd, 'evil': payload}}, path)
    else:
        path.write_bytes(pickle.dumps({'model': payload}, protocol=2 if how == 'pickle_p2' else 4))
    assert not marker.exists()

    for call in (lambda: load_checkpoint(_vit(1), path), lambda: read_state_dict(path)):
        with pytest.raises(CheckpointError, match=r'flatten_swin_tiny\.pth is a pickle that needs code execution .*'
                                                  r'refused for safety .*re-save the state dict as \.safetensors'):
            call()
        assert not marker.exists()

    # the payload is live: an unsafe unpickle of the same bytes would have created the marker
    live = tmp_path / 'live'
    pickle.loads(pickle.dumps(_Payload(live))).close()
    assert live.exists()


def test_refusal_names_the_blocked_global(tmp_path):
    torch.save({'model': {}, 'x': _Payload(tmp_path / 'm')}, tmp_path / 'x.pth')
    with pytest.raises(CheckpointError, match=r'\(it asks for io\.open\): refused'):
        read_state_dict(tmp_path / 'x.pth')
    assert issubclass(CheckpointError, AmapError)
