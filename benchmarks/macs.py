"""Does our MAC counter reproduce the literature and agree with fvcore, for every model of the zoo?

For timm's Swin/DeiT and every FLatten model registered by ``amap``, prints a Markdown table with:

* ours: :func:`amap.count_macs` (shapes only, on the meta device);
* fvcore MACs: fvcore's ``FlopCountAnalysis`` restricted to the operators that multiply (linear, matmul, conv, ...),
  with a handle for ``aten::scaled_dot_product_attention`` that fvcore lacks (it skips timm's fused attention
  otherwise); this is the like-for-like comparison and should equal ours exactly;
* fvcore default: fvcore's own total as papers report it (it adds LayerNorm/BatchNorm and pooling "flops", and
  misses fused attention);
* published: the figure in the papers (and, where known, fvcore on the official FLatten code).

Writes the same rows as JSON to ``--out``. Usage::

    python benchmarks/macs.py --out benchmarks/results/macs.json            # everything (a few minutes on 2 cores)
    python benchmarks/macs.py --out /tmp/macs.json --no-fvcore               # ours vs published only (seconds)
    python benchmarks/macs.py --out /tmp/macs.json --models flatten_swin_tiny deit_tiny_patch16_224
"""
from __future__ import annotations

import argparse
import os
import pkgutil
import sys
import time
from collections import Counter
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import timm  # noqa: E402
import torch  # noqa: E402

import amap  # noqa: E402
import amap.models  # noqa: E402
from amap.macs import count_macs  # noqa: E402
from amap.utils.io import atomic_write_json  # noqa: E402

TIMM_MODELS = [
    'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224',
    'swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224',
]

# Published GMACs ("FLOPs" in the papers): DeiT (Touvron et al. 2021), Swin (Liu et al. 2021), FLatten (Han et al.,
# ICCV 2023). 'official_fvcore': fvcore on the official FLatten code.
PUBLISHED: dict[str, dict[str, float]] = {
    'deit_tiny_patch16_224': {'paper': 1.3},
    'deit_small_patch16_224': {'paper': 4.6},
    'deit_base_patch16_224': {'paper': 17.6},
    'swin_tiny_patch4_window7_224': {'paper': 4.5},
    'swin_small_patch4_window7_224': {'paper': 8.7},
    'swin_base_patch4_window7_224': {'paper': 15.4},
    'flatten_swin_tiny': {'paper': 4.5, 'official_fvcore': 4.50},
    'flatten_swin_small': {'paper': 8.7},
    'flatten_swin_base': {'paper': 15.4},
    'flatten_pvt_tiny': {'paper': 2.0, 'official_fvcore': 2.05},
    'flatten_pvt_v2_b1': {'paper': 2.2, 'official_fvcore': 2.23},
    'flatten_pvt_v2_b2': {'paper': 4.3, 'official_fvcore': 4.27},
    'FLatten_CSWin_64_24181_tiny_224': {'paper': 4.3, 'official_fvcore': 4.34},
    'flatten_cswin_tiny': {'paper': 4.3, 'official_fvcore': 4.34},
    'flatten_deit_tiny': {'paper': 1.1},
}

# fvcore operator names that multiply (everything else it counts is norms, pooling or upsampling).
FVCORE_MAC_OPS = {'linear', 'matmul', 'conv', 'addmm', 'bmm', 'einsum', 'mm', 'sdpa'}


def zoo_models() -> list[str]:
    """Every model the FLatten zoo registers in timm, family by family."""
    names: list[str] = []
    for info in pkgutil.iter_modules(amap.models.__path__):
        if info.name.startswith('flatten_'):
            names += timm.list_models(module=info.name)
    return names


def _sdpa_handle(inputs: list, outputs: list) -> Counter:
    from fvcore.nn.jit_handles import get_shape
    b, h, nq, dq = get_shape(inputs[0])
    nk, dv = get_shape(inputs[1])[-2], get_shape(inputs[2])[-1]
    return Counter({'sdpa': b * h * nq * nk * (dq + dv)})


def fvcore_counts(name: str, ours_by_module: dict[str, int]) -> dict[str, Any]:
    """fvcore on a randomly initialised CPU copy of ``name``: like-for-like MACs, its default total, leaf agreement."""
    from fvcore.nn import FlopCountAnalysis
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg['input_size'])
    start = time.perf_counter()
    fa = FlopCountAnalysis(model, x).set_op_handle('aten::scaled_dot_product_attention', _sdpa_handle)
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = fa.by_operator()
    macs = sum(v for op, v in by_op.items() if op in FVCORE_MAC_OPS)
    default_total = fa.total() - by_op.get('sdpa', 0)  # fvcore's own total: everything but the SDPA we added
    by_module = fa.by_module()
    leaves = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    mismatched = [n for n in leaves if by_module.get(n, 0) != ours_by_module.get(n, 0)]
    return {
        'fvcore_macs': int(macs),
        'fvcore_default': int(default_total),
        'fvcore_leaves_checked': len(leaves),
        'fvcore_leaves_mismatched': mismatched,
        'fvcore_seconds': round(time.perf_counter() - start, 2),
    }


def measure(name: str, with_fvcore: bool) -> dict[str, Any]:
    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False)
    start = time.perf_counter()
    report = count_macs(model)
    row: dict[str, Any] = {
        'model': name,
        'input_size': list(report.input_size),
        'params': report.params,
        'ours': report.total,
        'ours_seconds': round(time.perf_counter() - start, 3),
        'by_category': report.by_category(),
        **{f'published_{k}': v for k, v in PUBLISHED.get(name, {}).items()},
    }
    if with_fvcore:
        row.update(fvcore_counts(name, report.by_module))
    return row


def _pct(a: float, b: float | None) -> str:
    return '' if not b else f'{100 * (a / b - 1):+.2f}%'


def markdown(rows: list[dict[str, Any]], with_fvcore: bool) -> str:
    head = ['model', 'input', 'params (M)', 'ours (G)']
    if with_fvcore:
        head += ['fvcore MACs (G)', 'ours - fvcore', 'Linear/Conv differing', 'fvcore default (G)']
    head += ['published (G)', 'ours vs published', 'official fvcore (G)', 'ours vs official fvcore']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * 2 + ['---:'] * (len(head) - 2)) + '|']
    for r in rows:
        g = r['ours'] / 1e9
        cells = [r['model'], 'x'.join(map(str, r['input_size'])), f"{r['params'] / 1e6:.2f}", f'{g:.3f}']
        if with_fvcore:
            diff = r['ours'] - r['fvcore_macs']
            leaves = f"{len(r['fvcore_leaves_mismatched'])} of {r['fvcore_leaves_checked']}"
            cells += [f"{r['fvcore_macs'] / 1e9:.3f}", f'{diff:+,}', leaves, f"{r['fvcore_default'] / 1e9:.3f}"]
        pub, off = r.get('published_paper'), r.get('published_official_fvcore')
        cells += [f'{pub}' if pub else '', _pct(g, pub), f'{off:.2f}' if off else '', _pct(g, off)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='JSON file to write the rows to')
    parser.add_argument('--models', nargs='*', default=None, help='model names (default: timm references + zoo)')
    parser.add_argument('--no-fvcore', action='store_true', help='skip fvcore (it runs real CPU forwards)')
    args = parser.parse_args(argv)
    names = args.models or TIMM_MODELS + zoo_models()
    with_fvcore = not args.no_fvcore
    rows = []
    failed = []
    for name in names:
        try:
            rows.append(measure(name, with_fvcore))
        except Exception as err:  # one broken model must not hide the others; it is reported and fails the run
            failed.append({'model': name, 'error': f'{type(err).__name__}: {err}'.splitlines()[0]})
            print(f'{name}: FAILED {failed[-1]["error"]}', file=sys.stderr, flush=True)
            continue
        print(f"{name}: {rows[-1]['ours'] / 1e9:.3f} GMACs", file=sys.stderr, flush=True)
    table = markdown(rows, with_fvcore)
    print(table)
    for f in failed:
        print(f"\nFAILED {f['model']}: {f['error']}")
    meta = {'torch': torch.__version__, 'timm': timm.__version__, 'amap': amap.__version__,
            'command': 'python benchmarks/macs.py ' + ' '.join(sys.argv[1:] if argv is None else argv)}
    atomic_write_json(args.out, {'meta': meta, 'rows': rows, 'failed': failed, 'markdown': table})
    return 1 if failed else 0


if __name__ == '__main__':
    raise SystemExit(main())
