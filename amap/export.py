"""Export a pruned model to ONNX (the graph has no pruning operators: gates are gone, reweights folded)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ConfigError
from .prune.artifact import input_side, load_pruned, read_pruned_config
from .utils.io import atomic_path
from .utils.outputs import Logits
from .utils.runfolder import run_lock

__all__ = ['export_onnx']


def export_onnx(
        artifact: str | os.PathLike,
        onnx_path: str | os.PathLike,
        *,
        img_size: int | None = None,
        opset: int | None = None,
        check: bool = True,
) -> tuple[Path, float | None]:
    """Export the pruned model in folder ``artifact`` to ``onnx_path`` (batch dimension dynamic).

    Args:
        artifact: Folder written by :func:`amap.save_pruned` (``OUT/model`` of ``amap prune``).
        onnx_path: Output file (written atomically).
        img_size: Input side (default: the one the model was pruned at).
        opset: ONNX opset (default: torch's).
        check: Run the exported graph in onnxruntime (when installed) and compare with PyTorch.

    Returns:
        The path and the largest absolute difference from PyTorch (None when not checked).
    """
    config = read_pruned_config(artifact)
    model = load_pruned(artifact).eval()
    size = img_size or input_side(config)
    if size is None:
        cfg = getattr(model, 'pretrained_cfg', {}) or {}
        size = (cfg.get('input_size') or (3, 224, 224))[-1]
    x = torch.randn(2, 3, int(size), int(size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not isinstance(model(x), torch.Tensor):  # e.g. a Hugging Face ModelOutput: export its logits
            model = Logits(model).eval()
    onnx_path = Path(onnx_path)
    if onnx_path.suffix != '.onnx':
        raise ConfigError(f'--onnx {onnx_path}: the file name must end in .onnx')
    kwargs = {} if opset is None else {'opset_version': opset}
    with run_lock(onnx_path.parent, arg='--onnx'), atomic_path(onnx_path) as tmp:  # run folder: one writer
        torch.onnx.export(model, (x,), str(tmp), input_names=['images'], output_names=['logits'],
                          dynamic_axes={'images': {0: 'batch'}, 'logits': {0: 'batch'}}, dynamo=False, **kwargs)
    if not check:
        return onnx_path, None
    try:
        import onnxruntime as ort
    except ImportError:
        return onnx_path, None
    session = ort.InferenceSession(str(onnx_path), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {'images': x.numpy()})
    with torch.no_grad():
        diff = float((torch.from_numpy(out) - model(x)).abs().max())
    return onnx_path, diff
