"""Property-based fuzzing (hypothesis) of the engine: surgery on random small architectures, and the pruned-artifact
loader on random corruptions of a valid ``config.json``.

Examples are derandomized (the same inputs on every run, so CI is deterministic) and the models tiny: the whole file
runs in well under a minute on one thread.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import amap
from amap.errors import AmapError, ConfigError
from amap.prune import PruneConfig, load_pruned, prune, save_pruned
from amap.prune.adapters import find_adapters
from amap.prune.artifact import CONFIG_NAME, WEIGHTS_NAME
from amap.prune.pruner import Pruner
from amap.train.factory import build_model
from amap.utils.outputs import logits_of

# AMAP_FUZZ_SCALE=20 runs 20x the examples (a long local search); CI runs the default, derandomized
SCALE = float(os.environ.get('AMAP_FUZZ_SCALE', '1'))
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# ---------------------------------------------------------------------------------------------------- architectures


def _deit_like(draw) -> tuple[dict[str, Any], int]:
    """Arguments shared by the ViT-shaped families: heads, head width, grid, depth, MLP ratio, pooling."""
    heads, head_dim = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 3, 4, 8]))
    img = draw(st.sampled_from([8, 16, 24, 32]))
    pool, cls = draw(st.sampled_from([('token', True), ('avg', False), ('avg', True)]))
    kwargs = dict(img_size=img, patch_size=draw(st.sampled_from([p for p in (4, 8) if img % p == 0])),
                  embed_dim=heads * head_dim, depth=draw(st.integers(1, 3)), num_heads=heads,
                  mlp_ratio=draw(st.sampled_from([1.0, 1.5, 2.0, 4.0])), num_classes=draw(st.integers(2, 10)),
                  global_pool=pool, class_token=cls)
    return kwargs, img


@st.composite
def vit_archs(draw) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """timm ``VisionTransformer``: random heads, head widths, depth, grid, pooling, prefix tokens, and the q/k, output
    and MLP norms that make a group unprunable."""
    kwargs, img = _deit_like(draw)
    kwargs.update(qkv_bias=draw(st.booleans()), reg_tokens=draw(st.integers(0, 2)))
    norm = draw(st.sampled_from([None, None, None, 'qk_norm', 'scale_attn_norm', 'scale_mlp_norm']))
    if norm:  # q/k norms make qk unprunable, an output norm v, an MLP norm the MLP (kept exactly by surgery)
        kwargs[norm] = True
    return 'vit_tiny_patch16_224', kwargs, (3, img, img)


@st.composite
def flatten_deit_archs(draw) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """``flatten_deit_nano`` with random heads, widths, depth, grid and DWC kernel."""
    kwargs, img = _deit_like(draw)
    kwargs['kernel_size'] = draw(st.sampled_from([3, 5]))
    return 'flatten_deit_nano', kwargs, (3, img, img)


@st.composite
def flatten_swin_archs(draw) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """``flatten_swin_nano`` with 1-3 stages of random depth, heads, windows (shifted or not) and L/S attention."""
    img, patch = draw(st.sampled_from([(16, 2), (16, 4), (32, 4)]))
    stages = draw(st.integers(1, min(3, int(math.log2(img // patch)))))  # each patch merging halves an even grid
    head_dim = draw(st.sampled_from([2, 4]))
    heads0 = draw(st.integers(1, 2))
    kwargs = dict(img_size=img, patch_size=patch, embed_dim=heads0 * head_dim,
                  depths=tuple(draw(st.integers(1, 2)) for _ in range(stages)),
                  num_heads=tuple(heads0 * 2 ** i for i in range(stages)),
                  window_size=draw(st.sampled_from([2, 4, 8])), softmax_window_size=draw(st.sampled_from([2, 4])),
                  attn_type=''.join(draw(st.sampled_from('LS')) for _ in range(stages)),
                  mlp_ratio=draw(st.sampled_from([1.0, 2.0])), num_classes=draw(st.integers(2, 10)))
    return 'flatten_swin_nano', kwargs, (3, img, img)


def _swin_like(draw) -> dict[str, Any]:
    """Arguments shared by the Swin-shaped families (16 px, patch 2): 1-2 stages, heads, windows, MLP ratio."""
    stages = draw(st.integers(1, 2))
    head_dim, heads0 = draw(st.sampled_from([2, 4])), draw(st.integers(1, 2))
    return dict(img_size=16, patch_size=2, embed_dim=heads0 * head_dim,
                depths=tuple(draw(st.integers(1, 2)) for _ in range(stages)),
                num_heads=tuple(heads0 * 2 ** i for i in range(stages)), window_size=draw(st.sampled_from([2, 4])),
                mlp_ratio=draw(st.sampled_from([1.0, 2.0])), num_classes=draw(st.integers(2, 10)))


@st.composite
def timm_swin_archs(draw) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """timm ``SwinTransformer`` (window attention with relative position bias) with 1-2 stages."""
    return 'swin_tiny_patch4_window7_224', _swin_like(draw), (3, 16, 16)


@st.composite
def library_swin_archs(draw) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """torchvision ``SwinTransformer`` (``ShiftedWindowAttention``) or Hugging Face ``SwinForImageClassification``
    with 1-2 stages."""
    k = _swin_like(draw)
    if draw(st.booleans()):  # torchvision divides by (blocks - 1): at least two blocks
        depths = [max(2, k['depths'][0]), *k['depths'][1:]]
        return 'torchvision:SwinTransformer', dict(
            patch_size=[2, 2], embed_dim=k['embed_dim'], depths=depths, num_heads=list(k['num_heads']),
            window_size=[k['window_size']] * 2, mlp_ratio=k['mlp_ratio'], num_classes=k['num_classes']), (3, 16, 16)
    return 'hf:SwinForImageClassification', dict(
        image_size=16, patch_size=2, embed_dim=k['embed_dim'], depths=list(k['depths']), num_heads=list(k['num_heads']),
        window_size=k['window_size'], mlp_ratio=k['mlp_ratio'], num_labels=k['num_classes']), (3, 16, 16)


@st.composite
def torchvision_vit_archs(draw) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """torchvision ``VisionTransformer`` (``nn.MultiheadAttention``, torchvision ``MLPBlock``)."""
    kwargs, img = _deit_like(draw)
    heads = kwargs['num_heads']
    return 'torchvision:VisionTransformer', dict(
        image_size=img, patch_size=kwargs['patch_size'], num_layers=kwargs['depth'], num_heads=heads,
        hidden_dim=kwargs['embed_dim'], mlp_dim=int(kwargs['embed_dim'] * kwargs['mlp_ratio']),
        num_classes=kwargs['num_classes']), (3, img, img)


@st.composite
def hf_vit_archs(draw) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """Hugging Face ``ViTForImageClassification`` / ``DeiTForImageClassification`` (q/k/v/o projections)."""
    kwargs, img = _deit_like(draw)
    return draw(st.sampled_from(['hf:ViTForImageClassification', 'hf:DeiTForImageClassification'])), dict(
        image_size=img, patch_size=kwargs['patch_size'], num_hidden_layers=kwargs['depth'],
        num_attention_heads=kwargs['num_heads'], hidden_size=kwargs['embed_dim'],
        intermediate_size=int(kwargs['embed_dim'] * kwargs['mlp_ratio']), num_labels=kwargs['num_classes'],
        qkv_bias=draw(st.booleans())), (3, img, img)


ARCHS = {'vit': vit_archs(), 'flatten_deit': flatten_deit_archs(), 'flatten_swin': flatten_swin_archs(),
         'timm_swin': timm_swin_archs(), 'torchvision_vit': torchvision_vit_archs(), 'hf_vit': hf_vit_archs(),
         'library_swin': library_swin_archs()}


def _create(arch: str, kwargs: dict[str, Any], seed: int) -> torch.nn.Module:
    """The model, with the zero-initialised FLatten/Swin parameters perturbed so that pruning them matters."""
    torch.manual_seed(seed)
    model = build_model(arch, kwargs).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('.scale', 'positional_encoding', 'relative_position_bias_table')):
                p.normal_(0, 0.5)
    return model


@st.composite
def prune_options(draw) -> dict[str, Any]:
    """A criterion with random constraints; the amap criterion with very few search steps and random switches."""
    criterion = draw(st.sampled_from(['magnitude', 'magnitude_l2', 'random', 'taylor', 'uniform', 'taylor_uniform',
                                       'amap']))
    kinds = tuple(k for k in ('qk', 'v', 'mlp') if draw(st.booleans())) or ('qk', 'v', 'mlp')
    opts = dict(criterion=criterion, kinds=kinds, min_keep=draw(st.sampled_from([1, 1, 2])), fill=draw(st.booleans()),
                channel_multiple=draw(st.sampled_from([1, 1, 1, 2, 4])), calib_batches=1, seed=draw(st.integers(0, 3)))
    if criterion == 'amap':
        opts.update(search_steps=2, log_every=1, head_balance=draw(st.booleans()), similarity=draw(st.booleans()),
                    attn_init=draw(st.booleans()), reweight=draw(st.booleans()), lr=draw(st.sampled_from([0.0, 5e-5])),
                    kd_alpha=draw(st.sampled_from([0.0, 0.5])), gate=draw(st.sampled_from(['ramp', 'binary'])))
    return opts


# ------------------------------------------------------------------------------------------------------ invariants


def _key(module: str, kind: str) -> str:
    return f'{module}.{kind}'.replace('.', '__')


def _physical_widths(module: torch.nn.Module) -> dict[str, int]:
    """Per-head widths read off the pruned module's tensors; asserts every head has the same widths."""
    if hasattr(module, 'fc1') or isinstance(module, torchvision.ops.MLP):  # an MLP: one "head"
        fc1, fc2 = (module.fc1, module.fc2) if hasattr(module, 'fc1') else \
            [m for m in module.children() if isinstance(m, torch.nn.Linear)]
        assert fc1.out_features == fc2.in_features
        return {'mlp': fc1.out_features}
    H, dq, dv = getattr(module, 'num_heads', None) or module.num_attention_heads, module.qk_dim, module.v_dim
    # one (q, k, v) layout for all heads: the projections only reshape to (heads, width) when every head is equal
    if hasattr(module, 'q_proj'):  # Hugging Face: q, k, v and o projections
        rows = module.q_proj.out_features + module.k_proj.out_features + module.v_proj.out_features
        proj = module.o_proj
    else:  # a fused qkv (timm, torchvision Swin) or in-projection (torchvision nn.MultiheadAttention)
        rows = module.in_proj_weight.shape[0] if hasattr(module, 'in_proj_weight') else module.qkv.out_features
        proj = getattr(module, 'out_proj', None) or module.proj
    assert rows == H * (2 * dq + dv), (module, H, dq, dv)
    assert proj.in_features == H * dv, (proj, H, dv)
    if hasattr(module, 'positional_encoding'):  # focused linear attention: per-channel parameters follow q/k
        assert module.scale.shape[-1] == module.positional_encoding.shape[-1] == H * dq
        assert module.dwc.weight.shape[0] == (dv if module.dwc.shared else H * dv)
        assert (module.dwc.v_dim, module.dwc.num_heads) == (dv, H)
    if hasattr(module, 'relative_position_bias_table'):
        assert module.relative_position_bias_table.shape[-1] == H
    return {'qk': dq, 'v': dv}


def _check_structure(result, reference: Pruner) -> dict[str, torch.Tensor]:
    """Head balance in the structure records and in the physical modules; returns the kept counts per group."""
    groups = {_key(g.module, g.kind): g for g in reference.groups().values()}
    counts: dict[str, torch.Tensor] = {}
    for rec in result.structure:
        physical = _physical_widths(result.model.get_submodule(rec['module']))
        for kind, rows in rec['indices'].items():
            group = groups[_key(rec['module'], kind)]
            width = rec['widths'][kind]
            assert rec['heads'][kind] == len(rows) == group.num_heads
            assert all(len(r) == width for r in rows), (rec['module'], kind, rows)  # every head keeps `width`
            assert all(r == sorted(set(r)) and 0 <= r[0] and r[-1] < group.dim for r in rows), rows
            assert 1 <= width <= group.dim
            assert physical[kind] == width, (rec['module'], kind, physical, width)
            counts[_key(rec['module'], kind)] = torch.full((group.num_heads,), width)
    assert counts.keys() == groups.keys()  # every group of the requested kinds has a record
    return counts


def _step(num_heads: int, multiple: int) -> int:
    """Per-head channel step keeping a balanced layer width (heads x count) a multiple of ``multiple``."""
    return multiple // math.gcd(num_heads, multiple)


def _masked_output(reference: Pruner, structure: list[dict], x: torch.Tensor) -> torch.Tensor:
    """The unpruned model with only the recorded channels gated on (what surgery must reproduce exactly)."""
    for rec in structure:
        for kind, rows in rec['indices'].items():
            ind = reference.indicators[_key(rec['module'], kind)]
            mask = torch.zeros(ind.group.num_heads, ind.group.dim)
            for h, row in enumerate(rows):
                mask[h, row] = 1.0
            ind.fixed = mask
    with torch.no_grad():
        return logits_of(reference.model[0].eval()(x))


@pytest.mark.parametrize('family', sorted(ARCHS))
@settings(max_examples=int(30 * SCALE), **FUZZ)
@given(data=st.data())
def test_surgery_on_random_architectures(family, data):
    arch, kwargs, size = data.draw(ARCHS[family], label='architecture')
    opts = data.draw(prune_options(), label='options')
    seed = data.draw(st.integers(0, 2**16), label='seed')
    model = _create(arch, kwargs, seed)
    original = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    n = kwargs.get('num_classes') or kwargs['num_labels']
    loader = [(torch.randn(4, *size, generator=g), torch.randint(0, n, (4,), generator=g)) for _ in range(2)]
    x = torch.randn(3, *size, generator=g)
    config = PruneConfig(**opts)
    base = {'architecture': arch, 'model_kwargs': kwargs}
    present = {gr.kind for a in find_adapters(original) for gr in a.groups()}
    if not present & set(opts['kinds']):  # e.g. only 'qk' of a ViT whose q/k norms make qk unprunable, or no group
        with pytest.raises(ConfigError, match='no prunable group|no module AMAP knows how to prune'):
            prune(model, loader, 0.7, config=config, input_size=size, base=base)
        event('refused: no group of the kinds')
        return
    # the unpruned model's analytic MACs, and its masked function (gates without reweights)
    reference = Pruner(copy.deepcopy(original), size, kinds=opts['kinds'], reweight=False)
    step = {k: _step(gr.num_heads, opts['channel_multiple']) for k, gr in reference.groups().items()}
    smallest = {k: torch.full((gr.num_heads,), min(gr.dim, math.ceil(opts['min_keep'] / step[k]) * step[k]))
                for k, gr in reference.groups().items()}
    lowest = float(reference.macs(smallest))  # MACs of the smallest structure the constraints allow, computed here
    low = lowest / reference.full_macs
    # mostly reachable targets, from the smallest structure to almost the whole model; sometimes unreachable ones
    reachable = low < 0.99 and seed % 8 != 7
    target = data.draw(st.floats(low, low + 0.97 * (1 - low)) if reachable else st.floats(0.5 * low, min(low, 0.99)),
                       label='target')
    try:
        result = prune(model, loader, target, config=config, input_size=size, base=base)
    except ConfigError as e:
        # the only refusal allowed: a target below the smallest structure the constraints allow, and truly so
        assert 'smallest structure' in str(e), str(e)
        assert target * reference.full_macs < lowest, str(e)
        event('refused: target below the smallest structure')
        return
    event(f'pruned with {opts["criterion"]}')

    # the pruned model runs and gives finite logits of the right shape
    pruned = result.model.eval()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pruned.modules())
    with torch.no_grad():
        y = logits_of(pruned(x))
    assert y.shape == (3, n) and bool(torch.isfinite(y).all())
    if opts['criterion'] != 'amap' or (opts['lr'] == 0 and not opts['reweight'] and opts['gate'] == 'binary'):
        # the weights were not trained, reweighted nor faded by the ramp gate: the pruned model is the masked
        # original, exactly
        torch.testing.assert_close(y, _masked_output(reference, result.structure, x), atol=1e-5, rtol=1e-5)

    # head balance, in the records and in the tensors; pruned layer widths aligned to the channel multiple
    counts = _check_structure(result, reference)
    for key, c in counts.items():
        gr = reference.groups()[key]
        assert int(c.sum()) % opts['channel_multiple'] == 0 or int(c[0]) == gr.dim, (key, c)

    # MACs: the executed counter, the result and the analytic count of the recorded structure agree; on target
    counted = amap.count_macs(pruned, size).total
    assert counted == result.macs_after
    assert result.macs_before == reference.full_macs == amap.count_macs(original, size).total
    assert counted == pytest.approx(float(reference.macs(counts)), abs=0.5)
    assert result.target_macs == pytest.approx(target * result.macs_before)
    assert counted <= result.target_macs and result.ratio <= target
    if all(rec['widths'].get('dwc_shared', True) for rec in result.structure):
        # (an un-shared DWC -- heads keeping different v channels -- holds a kernel per head: same MACs, more weights)
        assert result.params_after <= result.params_before
    if opts['fill'] and opts['criterion'] != 'uniform':
        # "lands at most one head-row of channels below the target": no group can grow by one channel (one aligned
        # step) per head
        for key, c in counts.items():
            if int(c[0]) < reference.groups()[key].dim:
                grown = dict(counts, **{key: (c + step[key]).clamp(max=reference.groups()[key].dim)})
                assert float(reference.macs(grown)) > result.target_macs, f'{key} could still grow'

    # the artifact round-trips to the same function
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(result, Path(tmp) / 'art')
        loaded = load_pruned(Path(tmp) / 'art')
        with torch.no_grad():
            assert torch.equal(logits_of(loaded(x)), y)
        assert amap.count_macs(loaded, size).total == counted


# ------------------------------------------------------------------------------------------------- artifact loader


ARTIFACTS = {  # name -> (timm architecture, its arguments); every one takes (3, 16, 16) inputs and has 5 classes
    'vit': ('vit_tiny_patch16_224', dict(img_size=16, patch_size=4, embed_dim=12, depth=2, num_heads=3, mlp_ratio=2.0,
                                         num_classes=5)),
    'flatten_deit': ('flatten_deit_nano', dict(img_size=16, patch_size=4, embed_dim=12, depth=2, num_heads=3,
                                               num_classes=5)),
    'flatten_swin': ('flatten_swin_nano', dict(img_size=16, embed_dim=8, depths=(1, 1), num_heads=(2, 4), window_size=8,
                                               softmax_window_size=4, attn_type='LS', num_classes=5)),
}


class _Artifacts(dict):
    def __repr__(self) -> str:  # keeps hypothesis' report of a failing example short
        return f'<artifacts {sorted(self)}>'


@pytest.fixture(scope='module')
def artifacts(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any], torch.Tensor]]:
    """Valid artifact folders, their configs and an input they accept (the starting points of the mutations)."""
    out = _Artifacts()
    for name, (arch, kwargs) in ARTIFACTS.items():
        g = torch.Generator().manual_seed(0)
        loader = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g))]
        result = prune(_create(arch, kwargs, 0), loader, 0.6, criterion='random', calib_batches=1,
                       base={'architecture': arch, 'model_kwargs': kwargs})
        folder = save_pruned(result, tmp_path_factory.mktemp('fuzz') / name)
        out[name] = folder, json.loads((folder / CONFIG_NAME).read_text()), torch.randn(2, 3, 16, 16, generator=g)
    return out


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON value, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-3, 300) | st.sampled_from([2**40, -2**40, 10**30])
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
                | st.sampled_from(['qk', 'v', 'mlp', 'dwc_shared', 'blocks.0.attn', 'blocks.0.mlp', 'layers.0',
                                   'MlpAdapter', 'SoftmaxAttentionAdapter', 'FocusedLinearAttentionAdapter',
                                   'flatten_deit_nano', 'flatten_swin_nano', 'vit_tiny_patch16_224']))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.sampled_from(['qk', 'v', 'mlp', 'module', 'adapter', 'widths', 'x']) | st.text(max_size=4), c, max_size=3),
    max_leaves=10)
WIDTHS = st.integers(-3, 40) | st.sampled_from([0, -1, 2**31, 2**62, 10**30]) | st.floats(allow_nan=True) | \
    st.booleans() | st.text(max_size=3)


def _mutate(data, config: dict[str, Any]) -> dict[str, Any]:
    """One structured mutation of a config (in place); returns it."""
    op = data.draw(st.sampled_from(['delete', 'replace', 'width', 'index', 'record', 'insert']), label='op')
    structure = config.get('structure') if isinstance(config, dict) else None
    records = [r for r in structure if isinstance(r, dict)] if isinstance(structure, list) else []
    if op == 'width' and records:
        rec = data.draw(st.sampled_from(records))
        if isinstance(rec.get('widths'), dict):
            key = data.draw(st.sampled_from(sorted(rec['widths']) + ['qk', 'v', 'mlp', 'dwc_shared', 'zz']))
            rec['widths'][key] = data.draw(WIDTHS, label='width')
            return config
    if op == 'index' and records:
        rec = data.draw(st.sampled_from(records))
        if isinstance(rec.get('indices'), dict) and rec['indices']:
            rows = rec['indices'][data.draw(st.sampled_from(sorted(rec['indices'])))]
            if isinstance(rows, list) and rows and isinstance(rows[0], list):
                row = rows[data.draw(st.integers(0, len(rows) - 1))]
                how = data.draw(st.sampled_from(['out', 'dup', 'drop', 'extra_head']))
                if how == 'out' and row:
                    row[0] = data.draw(st.sampled_from([-1, 10**6, 2**62]))
                elif how == 'dup' and row:
                    row.append(row[0])
                elif how == 'drop':
                    rows.remove(row)
                else:
                    rows.append(list(row))
                return config
    if op == 'record' and records:
        how = data.draw(st.sampled_from(['duplicate', 'swap_module', 'swap_adapter', 'rename']))
        a, b = data.draw(st.sampled_from(records)), data.draw(st.sampled_from(records))
        if how == 'duplicate':
            structure.append(copy.deepcopy(a))
        elif how == 'swap_module':
            a['module'], b['module'] = b.get('module'), a.get('module')
        elif how == 'swap_adapter':
            a['adapter'], b['adapter'] = b.get('adapter'), a.get('adapter')
        else:
            a['module'] = data.draw(st.sampled_from(['', 'blocks', 'blocks.7.attn', 'head', 'patch_embed.proj',
                                                     'layers.0.blocks.0', 'blocks.0.attn.qkv', 'norm']))
        return config
    paths = _paths(config)
    if op == 'delete' and len(paths) > 1:
        path = data.draw(st.sampled_from(paths[1:]), label='deleted')
        parent = _get(config, path[:-1])
        del parent[path[-1]]
        return config
    dicts = [p for p in paths if isinstance(_get(config, p), dict)]
    if op == 'insert' and dicts:
        path = data.draw(st.sampled_from(dicts), label='into')
        _get(config, path)[data.draw(st.text(max_size=5), label='key')] = data.draw(JSON_VALUES, label='value')
        return config
    path = data.draw(st.sampled_from(paths), label='replaced')
    value = data.draw(JSON_VALUES, label='value')
    if not path:
        return value
    _get(config, path[:-1])[path[-1]] = value
    return config


def _corrupt_file(data, text: str) -> bytes:
    """Byte-level corruption of config.json: truncation, random bytes, invalid UTF-8, spliced garbage."""
    raw = text.encode()
    how = data.draw(st.sampled_from(['truncate', 'bytes', 'splice', 'empty', 'utf8']), label='file')
    if how == 'truncate':
        return raw[:data.draw(st.integers(0, len(raw) - 1))]
    if how == 'bytes':
        return data.draw(st.binary(max_size=64))
    if how == 'splice':
        at = data.draw(st.integers(0, len(raw)))
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if how == 'utf8':
        return b'\xff\xfe' + raw
    return b''


@settings(max_examples=int(250 * SCALE), **FUZZ)
@given(data=st.data())
def test_artifact_loader_refuses_corrupt_configs_with_one_line_errors(artifacts, data):
    name = data.draw(st.sampled_from(sorted(artifacts)), label='artifact')
    source, config, _ = artifacts[name]
    config = copy.deepcopy(config)
    weights = (source / WEIGHTS_NAME).read_bytes()
    level = data.draw(st.sampled_from(['json'] * 8 + ['config bytes', 'weights bytes']), label='level')
    if level == 'config bytes':
        payload = _corrupt_file(data, json.dumps(config, indent=2))
    else:
        for _ in range(data.draw(st.integers(1, 3), label='mutations') if level == 'json' else 0):
            config = _mutate(data, config)
        payload = json.dumps(config, indent=2).encode()  # NaN / Infinity are written as Python's json does
    if level == 'weights bytes':  # a truncated or overwritten model.safetensors beside a valid config
        at = data.draw(st.integers(0, len(weights) - 1), label='at')
        weights = weights[:at] + (data.draw(st.binary(max_size=16), label='tail') if at > 8 else b'')
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / 'art'
        folder.mkdir()
        (folder / CONFIG_NAME).write_bytes(payload)
        (folder / WEIGHTS_NAME).write_bytes(weights)
        try:
            model = load_pruned(folder)
        except AmapError as e:
            message = str(e)
            event(f'refused: {type(e).__name__}')
            assert '\n' not in message, message
            assert str(folder) in message, message  # names the artifact (folder or file)
            return
    # Loaded: the config may legitimately describe another model than the one saved (e.g. another img_size where the
    # weights do not depend on it). The pruned model must run wherever its unpruned base model does.
    img = tuple(model.patch_embed.img_size)
    if max(img) > 256:
        event('loaded (input too large to run)')
        return
    x = torch.randn(2, 3, *img, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            timm.create_model(config['architecture'], **config['model_kwargs']).eval()(x)
    except Exception:  # noqa: BLE001 - e.g. a window that does not divide the token grid: the base model cannot run
        event('loaded (the base model does not run either)')
        return
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape[0] == 2
    event('loaded and ran')


def test_loader_fuzzing_starts_from_valid_artifacts(artifacts):
    # the mutations start from artifacts that load and run, with a pruned module of every adapter
    adapters = set()
    for source, config, x in artifacts.values():
        adapters |= {rec['adapter'] for rec in config['structure']}
        with torch.no_grad():
            assert load_pruned(source)(x).shape == (2, 5)
    assert adapters == {'SoftmaxAttentionAdapter', 'FocusedLinearAttentionAdapter', 'FLattenSoftmaxAdapter',
                        'MlpAdapter'}
