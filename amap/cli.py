"""The ``amap`` command (also ``python -m amap``): thin argument parsing on top of the public API.

Sub-commands::

    amap train --model NAME --data DIR|digits --epochs N --out DIR [--resume] ...
    amap eval  [--checkpoint] FILE|RUN_DIR [--model NAME] --data DIR|digits [--json]
    amap macs  MODEL [--img-size N]
    amap demo  [--out runs/demo] [--speedup 1.6 --latency-batch 32 | --target RATIO]

Every error the user can cause (:class:`amap.errors.AmapError`) prints one line ``amap: error: <message>`` to stderr
and exits with status 2. Under ``torchrun`` only rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import AmapError, ConfigError, Interrupted
from .utils.config import json_dict, positive_int

__all__ = ['main', 'build_parser']

_logger = logging.getLogger('amap')

DEMO_MODEL = 'flatten_deit_nano'
DEMO_EPOCHS = 25
# the demo's latency target: at batch 1 this model's time is mostly per-call overhead (cutting 94% of its MACs made it
# 1.2x faster, and 1.6x was out of reach), at batch 32 its widths count: 1.6x is measured there (README, demo)
DEMO_SPEEDUP = 1.6
DEMO_LATENCY_BATCH = 32


# ---------------------------------------------------------------------------------------------------------- arguments
def _add_eval_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('data')
    g.add_argument('--data', default='digits',
                   help="ImageNet-layout folder (train/<class>/*, val/<class>/* or test/) or 'digits' (embedded "
                        "default; default: %(default)s)")
    g.add_argument('--img-size', type=positive_int, default=None, help="input side in pixels (default: the "
                                                                         "checkpoint's)")
    g.add_argument('--batch-size', '-b', type=positive_int, default=None, help='batch size per process')
    g.add_argument('--workers', '-j', type=int, default=2, help='data loader processes (default: %(default)s)')
    g.add_argument('--interpolation', default=None, help='resize interpolation (default: bicubic)')
    g.add_argument('--split', default='val', choices=('val', 'test', 'train'),
                   help="split to evaluate ('val' falls back to test/; default: %(default)s)")
    g.add_argument('--subset', type=positive_int, default=None, help='evaluate on a class-balanced subset')


def _add_run_args(p: argparse.ArgumentParser, *, threads: int | None = None, device: bool = True,
                  default_device: str = 'auto') -> None:
    if device:
        p.add_argument('--device', default=default_device,
                       help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N' (default: %(default)s)")
        p.add_argument('--amp', default='auto', choices=('auto', 'on', 'off'),
                       help='mixed precision: float16 on CUDA, bfloat16 on the CPU (auto: on for CUDA only)')
    p.add_argument('--threads', type=positive_int, default=threads,
                   help='CPU threads per process for torch (default: ' + (
                       f'{threads}: the tiny model gains little from more, and a busy machine with more '
                       'threads than free cores slows down many-fold)' if threads else "torch's default)"))
    p.add_argument('--quiet', '-q', action='store_true', help='only warnings and the result')


class _Parser(argparse.ArgumentParser):
    """argparse with the same one-line error format as the rest of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'amap: error: {message} (see {self.prog} --help)\n')


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``amap`` command."""
    parser = _Parser(prog='amap', description='AMAP: automatic multi-head attention pruning for '
                                     'vision transformers (FLatten Transformer, timm ViT/DeiT/Swin).')
    from . import __version__
    parser.add_argument('--version', action='version', version=f'amap {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for add in (_add_train, _add_eval, _add_macs, _add_prune, _add_report, _add_export, _add_demo):
        add(sub)
    return parser


def _add_job(sub: Any, name: str, kind: type, options: dict[str, Any], func: Any, *, help: str,
             description: str) -> None:
    """A command whose every flag but --config, --threads and --quiet is a field of dataclass ``kind`` (or of the
    dataclasses nested in it): name, type, choices, help and default come from there."""
    from .utils.config import add_dataclass_arguments
    p = sub.add_parser(name, help=help, description=f'{description} Every option can come from --config YAML; flags '
                                                      f'given on the command line win.')
    p.add_argument('--config', default=None, metavar='YAML', help=f'options as YAML (keys as in {kind.__name__})')
    add_dataclass_arguments(p, kind, options=options)
    _add_run_args(p, device=False)
    p.set_defaults(func=func)


def _add_train(sub: Any) -> None:
    from .train.config import CLI_OPTIONS, TrainConfig
    _add_job(sub, 'train', TrainConfig, CLI_OPTIONS, _cmd_train,
             help='train a model (timm registry, FLatten zoo included)',
             description='Train a model; writes OUT/model.safetensors + model.json, checkpoints and log.jsonl. Under '
                         'torchrun it trains with DDP.')


def _add_eval(sub: Any) -> None:
    p = sub.add_parser('eval', help='evaluate a checkpoint (ours, official FLatten, or timm)',
                       description='Evaluate a checkpoint: a run folder or model.safetensors written by amap train '
                                   '(--model optional), or an official FLatten / timm checkpoint (--model required).')
    p.add_argument('path', nargs='?', default=None, metavar='CHECKPOINT', help='same as --checkpoint')
    p.add_argument('--checkpoint', '-c', default=None, metavar='FILE', help='checkpoint file or amap run folder')
    p.add_argument('--model', '-m', default=None, help='timm model name (needed for foreign checkpoints)')
    p.add_argument('--model-kwargs', type=json_dict, default={}, metavar='JSON', help='extra model arguments')
    _add_eval_data_args(p)
    p.add_argument('--json', action='store_true', help='print the metrics as JSON')
    _add_run_args(p)
    p.set_defaults(func=_cmd_eval)


def _add_macs(sub: Any) -> None:
    p = sub.add_parser('macs', help='count multiply-accumulates (per-module table)',
                       description='Count the MACs of one image through MODEL (a timm name or an amap run folder).')
    p.add_argument('model', metavar='MODEL', help='timm model name or amap run folder / model.safetensors')
    p.add_argument('--img-size', type=positive_int, default=None, help="input side (default: the model's)")
    p.add_argument('--num-classes', type=positive_int, default=None, help="classifier outputs (default: model's)")
    p.add_argument('--model-kwargs', type=json_dict, default={}, metavar='JSON', help='extra model arguments')
    p.add_argument('--depth', type=positive_int, default=2, help='module-name depth of the table (default: 2)')
    p.add_argument('--json', action='store_true', help='print the report as JSON')
    p.set_defaults(func=_cmd_macs)


def _add_prune(sub: Any) -> None:
    from .pipeline_config import CLI_OPTIONS, PipelineConfig
    _add_job(sub, 'prune', PipelineConfig, CLI_OPTIONS, _cmd_prune,
             help='prune a trained model to a MAC target (search, surgery, fine-tune, report)',
             description='Prune a trained model: calibrate, search the indicators under the MAC target, cut a '
                         'physically smaller model, fine-tune it with distillation from the original, evaluate both '
                         'and write OUT/model (config.json + model.safetensors), report.json/report.md and plots. '
                         'Under torchrun it runs with DDP.')


def _add_report(sub: Any) -> None:
    p = sub.add_parser('report', help='re-render the report of a prune run',
                       description='Re-render OUT/report.md and the plots from OUT/report.json and print it.')
    p.add_argument('out', metavar='DIR', help='output folder of amap prune')
    p.set_defaults(func=_cmd_report)


def _add_export(sub: Any) -> None:
    p = sub.add_parser('export', help='export a pruned model to ONNX',
                       description='Export a pruned model (a folder written by amap prune / amap.save_pruned) to '
                                   'ONNX, and check onnxruntime reproduces the PyTorch outputs when installed.')
    p.add_argument('path', metavar='DIR', help='pruned model folder (OUT/model of amap prune)')
    p.add_argument('--onnx', required=True, metavar='FILE', help='output .onnx file')
    p.add_argument('--img-size', type=positive_int, default=None, help="input side (default: the model's)")
    p.add_argument('--opset', type=positive_int, default=None, help="ONNX opset (default: torch's)")
    p.set_defaults(func=_cmd_export)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser('demo', help='train, prune to a latency target measured here, fine-tune and report, on '
                                    'embedded data',
                       description=f'Train a small FLatten Transformer on the embedded digits data (no download), '
                                   f'prune it until it runs {DEMO_SPEEDUP}x faster at batch {DEMO_LATENCY_BATCH} on '
                                   f'this machine (its latency measured here, predicted and checked), fine-tune it and '
                                   f'print the report table.')
    p.add_argument('--out', '-o', default='runs/demo', help='output folder (default: %(default)s)')
    p.add_argument('--model', '-m', default=DEMO_MODEL, help='default: %(default)s')
    p.add_argument('--epochs', type=positive_int, default=DEMO_EPOCHS, help='default: %(default)s')
    target = p.add_mutually_exclusive_group()
    target.add_argument('--speedup', type=float, default=None,
                        help=f'latency target: this many times faster than the trained model at --latency-batch, '
                             f'measured on this machine (default: {DEMO_SPEEDUP})')
    target.add_argument('--target', '-t', type=float, default=None,
                        help='a MAC target ratio instead of the latency target (e.g. 0.6)')
    p.add_argument('--latency-batch', type=positive_int, default=None,
                   help=f'batch size the latency target is for (default: {DEMO_LATENCY_BATCH}; not with --target)')
    p.add_argument('--search-epochs', type=float, default=2.0, help='default: %(default)s')
    p.add_argument('--finetune-epochs', type=int, default=5, help='default: %(default)s')
    p.add_argument('--seed', type=int, default=0, help='default: %(default)s')
    p.add_argument('--workers', '-j', type=int, default=2, help='data loader processes (default: %(default)s)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    # the CPU by default: a GPU runs a model this small at the pace of its kernel launches, not of its widths
    _add_run_args(p, threads=1, default_device='cpu')
    p.set_defaults(func=_cmd_demo)


# ---------------------------------------------------------------------------------------------------------- commands
def _rank() -> int:
    return int(os.environ.get('RANK', '0'))


def _print(text: str) -> None:
    if _rank() == 0:
        print(text, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train
    from .utils.config import given_options
    cfg = TrainConfig.load(args.config, **given_options(args, TrainConfig))
    result = train(cfg)
    m = result.metrics
    _print(f'{cfg.model}: top-1 {m["top1"]:.2f}%  top-5 {m["top5"]:.2f}%  loss {m["loss"]:.4f}  '
           f'({result.steps} steps, {result.epochs:.2f} epochs, {result.seconds:.1f} s) -> {result.model_path}')
    return 0


def _load_for_eval(args: argparse.Namespace, device: Any) -> tuple[Any, dict[str, Any], int | None]:
    """The model to evaluate, the data settings its checkpoint asks for, and its number of classes (None: any)."""
    from .train import load_trained, read_trained_meta, unknown_model_message
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise ConfigError(f'--checkpoint {ckpt}: no such file or folder')
    from .prune.artifact import input_side, load_pruned, pruned_folder, read_pruned_config
    folder = pruned_folder(ckpt)
    if folder is not None:  # a pruned model written by amap prune (its run folder too) / save_pruned
        config = read_pruned_config(folder)
        data = (config.get('extra') or {}).get('data') or {}
        settings = {k: data[k] for k in ('img_size', 'mean', 'std', 'interpolation') if data.get(k) is not None}
        if input_side(config):
            settings.setdefault('img_size', input_side(config))
        return load_pruned(folder, device=device), settings, data.get('num_classes')
    meta = read_trained_meta(ckpt) if (ckpt.is_dir() or ckpt.suffix == '.safetensors') else None
    if meta is not None:
        if args.model and args.model != meta.get('model'):
            raise ConfigError(f'--model {args.model} does not match the checkpoint, which holds {meta.get("model")}; '
                              f'drop --model or pass the right checkpoint')
        model = load_trained(ckpt, device=device)
        settings = {k: meta[k] for k in ('img_size', 'mean', 'std', 'interpolation') if meta.get(k) is not None}
        return model, settings, int(meta['num_classes'])
    if ckpt.is_dir():
        raise ConfigError(f'--checkpoint {ckpt}: folder without an amap {"model.safetensors"}; pass a checkpoint file')
    if not args.model:
        raise ConfigError(f'--checkpoint {ckpt} is not an amap run: pass --model NAME to build its architecture')
    from .train.factory import is_model
    if not is_model(args.model):
        from .errors import ModelError
        raise ModelError(unknown_model_message(args.model))
    return None, {}, None  # built once the data's number of classes is known (see _cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_eval_loader
    from .macs import check_input_size
    from .train import evaluate
    from .utils.distributed import cleanup_distributed, init_distributed
    if args.path and args.checkpoint and args.path != args.checkpoint:
        raise ConfigError(f'two checkpoints given ({args.path} and --checkpoint {args.checkpoint}); pass one')
    args.checkpoint = args.checkpoint or args.path
    if not args.checkpoint:
        raise ConfigError('no checkpoint given; pass --checkpoint FILE (a run folder, model.safetensors, or an '
                          'official/timm checkpoint with --model NAME)')
    info = init_distributed(args.device)
    try:
        model, settings, num_classes = _load_for_eval(args, info.device)
        img_size = args.img_size or settings.get('img_size')
        if model is None and img_size is None:
            import timm
            cfg = timm.models.get_pretrained_cfg(args.model) if timm.is_model(args.model) else None
            img_size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
        if model is None:  # a foreign checkpoint: its own size unless --img-size chose (an error if it contradicts)
            from .train.from_checkpoint import fit_image_size
            img_size = fit_image_size(args.checkpoint, img_size, given=args.img_size is not None)
        if settings.get('img_size') and args.img_size and args.img_size != settings['img_size']:
            _logger.warning('evaluating at --img-size %d; the model was trained at %d', args.img_size,
                            settings['img_size'])
        loader, data_classes = build_eval_loader(
            args.data, img_size=img_size, batch_size=args.batch_size or 256, num_workers=args.workers,
            split=args.split, distributed=info.distributed, subset=args.subset,
            interpolation=args.interpolation or settings.get('interpolation', 'bicubic'),
            mean=settings.get('mean'), std=settings.get('std'))
        if model is None:
            from .train.from_checkpoint import create_for_checkpoint
            model, _ = create_for_checkpoint(args.model, args.checkpoint, data_classes=data_classes,
                                             img_size=img_size, model_kwargs=args.model_kwargs)
            model.to(info.device).eval()
        elif num_classes is not None and num_classes != data_classes:
            raise ConfigError(f'{args.checkpoint} predicts {num_classes} classes but {args.data} has {data_classes}; '
                              f'evaluate on the data the model was trained for')
        trained_at = settings.get('img_size')
        check_input_size(model, (3, img_size, img_size), fix=f'use --img-size {trained_at} (the size it was trained at)'
                         if trained_at and trained_at != img_size else 'pass --img-size with the size it was built for')
        _check_embedded_data(args, model, img_size, data_classes)
        metrics = evaluate(model, loader, device=info.device, amp=args.amp, progress=not args.quiet)
    finally:
        cleanup_distributed(info)
    if args.json:
        _print(json.dumps({'checkpoint': str(args.checkpoint), 'data': str(args.data), **metrics}))
    else:
        _print(f'top-1 {metrics["top1"]:.2f}%  top-5 {metrics["top5"]:.2f}%  loss {metrics["loss"]:.4f}  '
               f'images {metrics["images"]}  {metrics["images_per_s"]:.0f} img/s')
    return 0


def _check_embedded_data(args: argparse.Namespace, model: Any, img_size: int, data_classes: int) -> None:
    """Scoring a model on the embedded digits data needs a model of their classes: else an error naming --data."""
    if args.data != 'digits':
        return
    import torch

    from .utils.outputs import logits_of
    p = next(model.parameters())
    with torch.no_grad():
        classes = logits_of(model(torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype))).shape[-1]
    if classes != data_classes:
        raise ConfigError(f'{args.checkpoint} predicts {classes} classes and the embedded digits data (the default '
                          f'--data) has {data_classes}; pass --data with the data the model was trained for')


def _cmd_macs(args: argparse.Namespace) -> int:
    import timm

    from .macs import count_macs
    from .prune.artifact import input_side, load_pruned, pruned_folder, read_pruned_config
    from .train import create_model, load_trained, unknown_model_message
    from .train.factory import is_model, native_img_size
    path = Path(args.model)
    folder = pruned_folder(path) if path.exists() else None
    if folder is not None:  # a pruned model, or the run folder of amap prune
        model = load_pruned(folder)
        size = args.img_size or input_side(read_pruned_config(folder))
    elif path.exists() and (path.is_dir() or path.suffix == '.safetensors'):
        model = load_trained(path)
        size = args.img_size or model.amap_meta.get('img_size')
    else:
        if not is_model(args.model):
            from .errors import ModelError
            raise ModelError(unknown_model_message(args.model))
        kwargs = dict(args.model_kwargs)
        if args.num_classes is not None:
            kwargs.setdefault('num_classes', args.num_classes)
        cfg = timm.models.get_pretrained_cfg(args.model) if timm.is_model(args.model) else None
        classes = kwargs.pop('num_classes', None) or (cfg.num_classes if cfg is not None else None) or 1000
        model, _ = create_model(args.model, num_classes=classes, img_size=args.img_size, model_kwargs=kwargs)
        size = args.img_size or native_img_size(model)
    report = count_macs(model, input_size=size)
    print(report.to_json() if args.json else report.format_table(max_depth=args.depth))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from .pipeline import PipelineConfig, load_config, run
    from .utils.config import given_options
    result = run(load_config(args.config, **given_options(args, PipelineConfig)))
    if _rank() == 0:
        from .report import format_report
        print(format_report(result.report))
        print(f'pruned model: {result.out / "model"}   report: {result.out / "report.md"}')
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import REPORT_JSON, render_report
    out = Path(args.out)
    if not (out / REPORT_JSON).is_file():
        raise ConfigError(f'{out}: no {REPORT_JSON}; pass the output folder of amap prune')
    print(render_report(out))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    path, check = export_onnx(args.path, args.onnx, img_size=args.img_size, opset=args.opset)
    print(f'exported {path}' + (f' (onnxruntime max |diff| {check:.2e})' if check is not None else ''))
    return 0


def _demo_target(args: argparse.Namespace) -> tuple[Any, str]:
    """The demo's pruning options (checked before the training starts) and how to name the target."""
    from .prune.config import PruneConfig
    if args.target is not None:
        if args.latency_batch is not None:
            raise ConfigError('--latency-batch is for the latency target: drop it, or --target (a MAC target)')
        return PruneConfig(target=args.target), f'to {args.target:.0%} of its MACs'
    speedup = DEMO_SPEEDUP if args.speedup is None else args.speedup
    cfg = PruneConfig(resource='latency', speedup=speedup, latency_batch=args.latency_batch or DEMO_LATENCY_BATCH,
                      latency_threads=args.threads or 1)
    threads = cfg.latency_threads
    return cfg, (f'until it runs {speedup:g}x faster at batch {cfg.latency_batch}, {threads} thread'
                 f'{"s" if threads > 1 else ""}, as timed on this machine')


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data import DataConfig
    from .macs import count_macs, count_params
    from .train import TrainConfig, evaluate, train
    out = Path(args.out)
    prune, goal = _demo_target(args)
    cfg = TrainConfig(
        model=args.model, data=DataConfig(data='digits', img_size=32, batch_size=64, num_workers=args.workers),
        epochs=args.epochs, lr=2e-3, weight_decay=0.05, warmup_epochs=1.0, seed=args.seed, out_dir=str(out),
        overwrite=True, eval_every=5, device=args.device, amp=args.amp, log_every=50,
        progress=not args.no_progress)
    _print(f'amap demo: training {cfg.model} on the embedded digits data ({cfg.epochs} epochs) -> {out}')
    result = train(cfg)
    if _rank() != 0:
        return 0
    from .data import build_eval_loader
    loader, _ = build_eval_loader('digits', img_size=32, batch_size=256, num_workers=0)
    metrics = evaluate(result.model, loader, amp=args.amp)  # an independent re-evaluation of the saved model
    report = count_macs(result.model, input_size=32)
    rows = [
        ('model', cfg.model),
        ('parameters', f'{count_params(result.model) / 1e6:.3f} M'),
        ('MACs / image', f'{report.total / 1e6:.2f} M'),
        ('top-1 (digits val)', f'{metrics["top1"]:.2f}%'),
        ('top-5 (digits val)', f'{metrics["top5"]:.2f}%'),
        ('training', f'{result.steps} steps, {result.seconds:.0f} s'),
        ('inference', f'{metrics["images_per_s"]:.0f} images/s'),
        ('saved to', str(result.model_path)),
    ]
    width = max(len(k) for k, _ in rows)
    print('\n' + '\n'.join(f'  {k:<{width}}  {v}' for k, v in rows))
    from .pipeline import run
    from .report import format_report
    _print(f'\namap demo: pruning {cfg.model} {goal} (search {args.search_epochs:g} epochs, fine-tune '
           f'{args.finetune_epochs} epochs) -> {out / "prune"}')
    pruned = run(model=cfg.model, checkpoint=str(out), data={'data': 'digits', 'img_size': 32, 'batch_size': 64,
                                                          'num_workers': args.workers},
                 prune=prune, search_epochs=args.search_epochs, finetune_epochs=args.finetune_epochs,
                 finetune_lr=1e-3, out=str(out / 'prune'), overwrite=True, seed=args.seed, device=args.device,
                 amp=args.amp, progress=not args.no_progress, latency_rounds=10)
    print('\n' + format_report(pruned.report))
    return 0


# ---------------------------------------------------------------------------------------------------------- main
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record: ``main()`` may run many times in one process (tests,
    notebooks) with stderr replaced in between, and a handler bound to a closed stream prints a logging traceback."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


_shown_by: list[Any] = [warnings.showwarning]  # how warnings other than AMAP's are shown


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """AMAP's own warnings (``DataWarning``, ...) as one line through the ``amap`` logger; others as Python shows
    them. A warning is issued once (Python's default filter), so it is printed once."""
    if category.__module__.partition('.')[0] == 'amap':
        _logger.warning('%s', message)
    else:
        _shown_by[0](message, category, filename, lineno, file, line)


def _setup_logging(quiet: bool) -> None:
    if warnings.showwarning is not _show_warning:
        _shown_by[0], warnings.showwarning = warnings.showwarning, _show_warning
    level = logging.WARNING if quiet or _rank() != 0 else logging.INFO
    root = logging.getLogger('amap')
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter('%(message)s'))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``amap`` command; returns the exit status (2 for user errors, printed as one line)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, 'quiet', False))
    if getattr(args, 'threads', None):
        import torch
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        return int(args.func(args) or 0)
    except Interrupted as e:
        print(f'amap: interrupted: {str(e).strip().splitlines()[0]}', file=sys.stderr, flush=True)
        return 130
    except AmapError as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f'amap: error: {message}', file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f'amap: interrupted after {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)
        return 130


if __name__ == '__main__':
    raise SystemExit(main())
