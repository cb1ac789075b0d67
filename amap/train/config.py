"""The training job's settings (:class:`TrainConfig`), their validation and the settings a resume may change."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DataConfig
from ..errors import ConfigError
from ..utils.config import check_contained_out, deep_merge, from_mapping, read_yaml
from ..utils.io import to_jsonable
from ..utils.runfolder import check_resume

__all__ = ['TrainConfig', 'CLI_OPTIONS']

CLI_OPTIONS: dict[str, dict[str, Any]] = {
    'data': {'only': ('data', 'img_size', 'batch_size', 'eval_batch_size', 'num_workers', 'augment', 'randaugment',
                      'mixup', 'cutmix', 'train_subset', 'val_subset', 'interpolation', 're_prob')},
}
"""The data options ``amap train`` takes on the command line (``label_smoothing`` is the job's own field; ``mean``
and ``std`` come from the model)."""

_RESUME_FREE = frozenset({
    'out_dir', 'resume', 'overwrite', 'max_steps', 'progress', 'log_every', 'device', 'eval_every', 'checkpoint_every',
    'keep_checkpoints', 'data.num_workers', 'data.eval_batch_size', 'data.val_subset',
})
"""Settings that may change when resuming; every other one shapes the trajectory and must stay the same."""


@dataclass
class TrainConfig:
    """A training job.

    Attributes:
        model: timm model name (``import amap`` registers the FLatten zoo, e.g. ``'flatten_deit_nano'``).
        model_kwargs: Extra keyword arguments of the model factory (``num_classes`` and ``img_size`` come from the
            data unless given here).
        data: Data source, augmentation and batch size per process (see :class:`amap.data.DataConfig`).
        epochs: Number of epochs (the cosine schedule spans them).
        lr: Peak learning rate (after warm-up).
        weight_decay: Weight decay (timm excludes biases and norm weights).
        warmup_epochs: Linear warm-up length in epochs (may be fractional).
        warmup_lr: Learning rate at the start of the warm-up.
        min_lr: Learning rate at the end of the cosine schedule.
        opt: timm optimizer name.
        sched: timm scheduler name; stepped per update.
        clip_grad: Clip the gradient norm to this value (``None``: no clipping).
        label_smoothing: Label smoothing; ``None`` uses ``data.label_smoothing`` (this value overrides it).
        amp: ``'auto'`` (float16 autocast + GradScaler on CUDA, off on CPU), ``'on'`` (also on the CPU: bfloat16
            autocast, about 1.6x faster training on CPUs with AVX-512 BF16) or ``'off'``.
        seed: Seed of model initialisation, data order, augmentation and dropout.
        out_dir: Output folder (model, checkpoints, log).
        resume: Continue the run in ``out_dir`` from its latest checkpoint (``True``; an error if there is none), or
            from the run folder / checkpoint folder given.
        overwrite: Start afresh in an ``out_dir`` that holds a previous run (its checkpoints and log are deleted).
        checkpoint_every: Also checkpoint every this many updates (0: only at the end of each epoch).
        eval_every: Evaluate every this many epochs (the last epoch is always evaluated; 0: only the last).
        device: ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` (under torchrun each process uses its local GPU).
        log_every: Log (JSON-lines record, progress line) every this many updates.
        max_steps: Stop after this many updates in total (the schedule still spans ``epochs``); for quick runs.
        accum_steps: Gradient accumulation: batches per optimizer update.
        progress: Show a progress bar (rank 0, interactive terminals only).
        keep_checkpoints: Number of checkpoint folders to keep.
    """
    model: str = field(default='flatten_deit_nano', metadata={'flags': ('--model', '-m')})
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = field(default=10, metadata={'min': 1})
    lr: float = 1e-3
    weight_decay: float = field(default=0.05, metadata={'flags': ('--weight-decay', '--wd')})
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    opt: str = 'adamw'
    sched: str = 'cosine'
    clip_grad: float | None = None
    label_smoothing: float | None = field(default=None, metadata={'flags': ('--label-smoothing', '--smoothing')})
    amp: str = field(default='auto', metadata={'choices': ('auto', 'on', 'off')})
    seed: int = 0
    out_dir: str = field(default='runs/train', metadata={'flags': ('--out', '-o'), 'metavar': 'DIR'})
    resume: bool | str = field(default=False, metadata={'nargs': '?', 'const': True, 'metavar': 'DIR'})
    overwrite: bool = False
    checkpoint_every: int = field(default=0, metadata={'min': 0, 'metavar': 'STEPS'})
    eval_every: int = field(default=1, metadata={'min': 0, 'metavar': 'EPOCHS'})
    device: str = 'auto'
    log_every: int = field(default=20, metadata={'min': 0, 'metavar': 'STEPS'})
    max_steps: int | None = field(default=None, metadata={'min': 1})
    accum_steps: int = field(default=1, metadata={'min': 1})
    progress: bool = True
    keep_checkpoints: int = field(default=2, metadata={'min': 1})

    def __post_init__(self) -> None:
        if isinstance(self.data, Mapping):
            self.data = from_mapping(DataConfig, self.data, where='data')

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the configuration."""
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TrainConfig:
        """Build from a (YAML/JSON) mapping; ``data`` may be a nested mapping of :class:`DataConfig` fields.

        Raises:
            ConfigError: an unknown key (with the closest valid name) or a value of the wrong type.
        """
        return from_mapping(cls, doc, where='train config')

    @property
    def smoothing(self) -> float:
        """The label smoothing in effect (``label_smoothing``, else ``data.label_smoothing``)."""
        return self.data.label_smoothing if self.label_smoothing is None else self.label_smoothing

    def check(self) -> None:
        """Check the values.

        Raises:
            ConfigError: the first invalid value, named with what it must be.
        """
        checks = [
            (self.epochs >= 1, 'epochs', 'must be >= 1'),
            (self.lr > 0, 'lr', 'must be > 0'),
            (self.weight_decay >= 0, 'weight_decay', 'must be >= 0'),
            (self.warmup_epochs >= 0, 'warmup_epochs', 'must be >= 0'),
            (self.min_lr >= 0, 'min_lr', 'must be >= 0'),
            (self.clip_grad is None or self.clip_grad > 0, 'clip_grad', 'must be > 0 (or None for no clipping)'),
            (self.label_smoothing is None or 0 <= self.label_smoothing < 1, 'label_smoothing', 'must be in [0, 1)'),
            (self.checkpoint_every >= 0, 'checkpoint_every', 'must be >= 0'),
            (self.eval_every >= 0, 'eval_every', 'must be >= 0'),
            (self.log_every >= 0, 'log_every', 'must be >= 0'),
            (self.max_steps is None or self.max_steps >= 1, 'max_steps', 'must be >= 1'),
            (self.accum_steps >= 1, 'accum_steps', 'must be >= 1'),
            (self.keep_checkpoints >= 1, 'keep_checkpoints', 'must be >= 1'),
            (isinstance(self.model_kwargs, dict), 'model_kwargs', 'must be a dict'),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ConfigError(f'train config {name}={getattr(self, name)!r} is invalid: {fix}')
        if not math.isfinite(self.lr):
            raise ConfigError(f'train config lr={self.lr!r} is invalid: must be finite')

    def check_resume(self, saved: Mapping[str, Any], folder: Path) -> None:
        """Refuse to resume the checkpoint ``folder`` (whose run had the configuration ``saved``) with settings that
        would change the run (batch size, schedule, data, model, ...).

        Raises:
            ConfigError: every setting that differs, with both values, in one line.
        """
        check_resume(_effective_smoothing(saved), _effective_smoothing(self.to_dict()), free=_RESUME_FREE,
                     where=str(folder.parent.parent))

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
        """A :class:`TrainConfig` from a YAML file (``None``: the defaults) with keyword overrides (``data`` may be a
        mapping that overrides the file's data options one by one); ``None`` values do not override.

        A YAML file's ``out_dir`` must stay below the current folder unless ``out_dir`` is overridden (``--out``).

        Raises:
            ConfigError: a missing or invalid file, an unknown key (with the closest name) or a wrong type.
        """
        doc, where = ({}, 'train config') if source is None else (read_yaml(source), str(source))
        if source is not None and 'out_dir' in doc and overrides.get('out_dir') is None:
            check_contained_out(doc['out_dir'], where)
        doc = deep_merge(doc, {k: v for k, v in overrides.items() if v is not None})
        return from_mapping(cls, doc, where=where)


def _effective_smoothing(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` with the label smoothing in effect in both of its places (``label_smoothing`` overrides the data's):
    runs that said the same thing in either place compare equal."""
    data = dict(doc.get('data') or {})
    value = doc.get('label_smoothing')
    value = data.get('label_smoothing', 0.0) if value is None else value
    return {**doc, 'label_smoothing': value, 'data': {**data, 'label_smoothing': value}}
