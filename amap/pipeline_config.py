"""The options of one ``amap prune`` job (:class:`PipelineConfig`) and where they come from: a YAML file, keyword
overrides, the command line (whose flags are read off these dataclasses, see :mod:`amap.cli`), or Python.

The pruning method's own options are :class:`~amap.prune.PruneConfig` (with the search loop's
:class:`~amap.prune.SearchSettings` nested), held as ``prune``; :func:`load_config` also reads the older layouts that
kept some of them at the top level or flat in ``prune``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .data import DataConfig
from .errors import ConfigError
from .prune.config import PruneConfig, SearchSettings, nest_search_options
from .utils.config import check_contained_out, check_keys, check_value, deep_merge, from_mapping, read_yaml
from .utils.io import to_jsonable

__all__ = ['PipelineConfig', 'CLI_OPTIONS', 'load_config']

@dataclass
class PipelineConfig:
    """One ``amap prune`` job. The ``amap prune`` flags, their help and defaults are read off these fields (and those
    of :class:`~amap.prune.PruneConfig` and its :class:`~amap.prune.SearchSettings`; see :data:`CLI_OPTIONS`).

    Attributes:
        model: timm name of the model; needed for official/timm weights, optional for a run of ``amap train`` (which
            names its own; a different name is an error).
        checkpoint: The trained weights: an ``amap train`` run folder or ``model.safetensors``, or an official
            FLatten / timm checkpoint (``.pth``, ``.safetensors``) for ``model``.
        model_kwargs: Extra arguments of the model factory, as a JSON object.
        num_classes: Class count of the model's head when it differs from the checkpoint's (needs reset_head).
        reset_head: Replace the checkpoint's head by a new num_classes-way head (else a head whose class count
            differs from the data's is kept and the model evaluated against the checkpoint's classes).
        data: Data source, augmentation and batch size (per process).
        prune: The pruning method (:class:`amap.prune.PruneConfig`): MAC target, criterion, switches, and ``search``,
            the search loop's settings (its ``kd_alpha`` also weighs the fine-tune's distillation).
        search_epochs: Length of the search in epochs of the training data. Half an epoch: on a FLatten-DeiT at
            80% on CIFAR-10, a half-epoch search then fine-tuning beat a whole-epoch search by 1.1 points at the same
            total steps (BENCHMARKS.md, the epoch-40 probe).
        search_steps: Length of the search in steps (overrides search_epochs).
        finetune_epochs: Fine-tuning epochs after surgery (0: none).
        finetune_steps: Length of the fine-tune in optimizer updates instead (overrides finetune_epochs; the schedule
            spans exactly these updates, the last epoch is cut short), e.g. to give a shorter search's remaining
            steps to the fine-tune.
        finetune_lr: Peak fine-tuning learning rate.
        finetune_min_lr: Final fine-tuning learning rate (cosine).
        finetune_warmup_epochs: Fine-tuning warm-up epochs.
        weight_decay: Fine-tuning weight decay.
        clip_grad: Gradient-norm clipping in the fine-tune.
        teacher: Distil from the original model (original), in the search and the fine-tune, or not (none).
        out: Output folder.
        resume: Continue the run in out from its last checkpoint.
        overwrite: Replace a previous run in out.
        checkpoint_every: Search steps between search checkpoints (and fine-tune updates between fine-tune
            checkpoints, besides every epoch end); 0 = automatic (about 10 per search).
        seed: Seed of everything.
        device: auto (CUDA when present), cpu, cuda or cuda:N.
        amp: Mixed precision in the search and the fine-tune: float16 on CUDA, bfloat16 on the CPU (auto: on for
            CUDA only).
        accum_steps: Gradient accumulation: batches per optimiser update, in the search and the fine-tune (a
            step's global batch is ``batch_size x processes x accum_steps``).
        latency: Measure CPU (and CUDA) latency before/after for the report.
        latency_rounds: Timed rounds of the latency measurement.
        max_finetune_steps: Stop the fine-tune after this many updates (quick runs).
        progress: Progress bars on interactive terminals.
    """

    model: str | None = field(default=None, metadata={'flags': ('--model', '-m')})
    checkpoint: str | None = field(default=None, metadata={'flags': ('--checkpoint', '-c'), 'metavar': 'FILE'})
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = field(default=None, metadata={'min': 1})
    reset_head: bool = False
    data: DataConfig = field(default_factory=lambda: DataConfig(img_size=None))
    prune: PruneConfig = field(default_factory=PruneConfig)
    search_epochs: float = 0.5
    search_steps: int | None = field(default=None, metadata={'min': 1})
    finetune_epochs: int = 5
    finetune_steps: int | None = field(default=None, metadata={'min': 1})
    finetune_lr: float = 2e-4
    finetune_min_lr: float = 1e-6
    finetune_warmup_epochs: float = 0.0
    weight_decay: float = field(default=0.05, metadata={'flags': ('--finetune-weight-decay',)})
    clip_grad: float | None = field(default=5.0, metadata={'flags': ('--finetune-clip-grad',)})
    teacher: str = field(default='original', metadata={'choices': ('original', 'none')})
    out: str = field(default='runs/prune', metadata={'flags': ('--out', '-o')})
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = field(default=0, metadata={'min': 0, 'metavar': 'STEPS'})
    seed: int = 0
    device: str = 'auto'
    amp: str = field(default='auto', metadata={'choices': ('auto', 'on', 'off')})
    accum_steps: int = field(default=1, metadata={'min': 1})
    latency: bool = True
    latency_rounds: int = field(default=15, metadata={'min': 1})
    max_finetune_steps: int | None = field(default=None, metadata={'min': 1})
    progress: bool = True

    @property
    def kd_alpha(self) -> float:
        """Weight of the distillation loss, in the search and the fine-tune (``prune.search.kd_alpha``)."""
        return self.prune.search.kd_alpha

    def prune_config(self) -> PruneConfig:
        """The pruning options (:attr:`prune`)."""
        return self.prune

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))


# the data options `amap prune` takes on the command line (their flags are in DataConfig's field metadata)
CLI_OPTIONS: dict[str, dict[str, Any]] = {
    'data': {'only': ('data', 'img_size', 'batch_size', 'num_workers', 'train_subset', 'val_subset')},
    'data.img_size': {'help': 'Side of the square model input in pixels (default: the size the checkpoint was made '
                              'for: an amap train run\'s, or read off a position embedding; else 32).'},
}

# options that configs written before ``prune`` held them kept at the top level (read into ``prune``)
_TOP_LEVEL_PRUNE_KEYS = ('target', 'kd_alpha')


def load_config(source: PipelineConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                **overrides: Any) -> PipelineConfig:
    """A :class:`PipelineConfig` from a config object, a mapping or a YAML file, with keyword overrides (nested
    mappings override section by section, e.g. ``prune={'search': {'lr': 0}}``).

    YAML is parsed with ``yaml.safe_load`` (no object tags); unknown keys are errors that name the closest valid key,
    and values are checked against the fields' types (:mod:`amap.utils.config`). A YAML file's ``out`` must stay
    below the current folder (no absolute path, ``~`` or ``..``) unless ``out`` is overridden (``--out``). Older
    layouts are read too: ``target`` and ``kd_alpha`` at the top level, and the search settings directly in
    ``prune`` (``lr``, ``indicator_lr``, ...).
    """
    doc, where = _read_source(source)
    if isinstance(source, (str, os.PathLike)) and 'out' in doc and overrides.get('out') is None:
        check_contained_out(doc['out'], where, key='out')
    overrides = {k: v for k, v in overrides.items() if v is not None}
    doc = deep_merge(_current_layout(doc, where), _current_layout(overrides, 'config'))
    check_keys(PipelineConfig, doc, where, aliases=_TOP_LEVEL_PRUNE_KEYS)
    data = doc.get('data') or {}
    if isinstance(data, DataConfig):
        data = dataclasses.asdict(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f'{where}: data must be a mapping of data options, got {data!r}')
    doc['data'] = from_mapping(DataConfig, {'img_size': None, **data}, where=f'{where} (data)')
    doc['prune'] = from_mapping(PruneConfig, doc.get('prune') or {}, where=f'{where}, prune options')
    if doc['prune'].search.steps is not None:
        raise ConfigError(f'{where}: the search length of amap prune is search_steps or search_epochs (top level), '
                          f'not prune.search.steps')
    cfg = from_mapping(PipelineConfig, doc, where=where)
    if cfg.accum_steps < 1:
        raise ConfigError(f'{where}: accum_steps must be >= 1, got {cfg.accum_steps}')
    if cfg.teacher not in ('original', 'none'):
        raise ConfigError(f"{where}: teacher must be 'original' or 'none', got {cfg.teacher!r}")
    return cfg


def _read_source(source: PipelineConfig | Mapping[str, Any] | str | os.PathLike | None) -> tuple[dict, str]:
    """The options of ``source`` as a mapping, and how to name it in errors."""
    if isinstance(source, PipelineConfig):
        return dataclasses.asdict(source), 'config'
    if source is None or isinstance(source, Mapping):
        return dict(source or {}), 'config'
    return read_yaml(source), str(source)


def _current_layout(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``doc`` with the older layouts' keys where they are now: the one place that maps old key names.

    ``target`` and ``kd_alpha`` at the top level go into ``prune`` (where ``prune`` does not set them itself);
    flat search settings in ``prune`` go into ``prune.search`` (:func:`amap.prune.config.nest_search_options`).
    Values are checked under the names they were given by.
    """
    doc = dict(doc)
    prune = doc.get('prune')
    if isinstance(prune, PruneConfig):
        prune = dataclasses.asdict(prune)
    if not isinstance(prune or {}, Mapping):
        raise ConfigError(f'{where}: prune must be a mapping of pruning options, got {prune!r}')
    prune = nest_search_options(prune or {}, where=f'{where}, prune options')
    search = prune.get('search') or {}
    search = dataclasses.asdict(search) if isinstance(search, SearchSettings) else dict(search)
    if 'target' in doc:
        prune.setdefault('target', check_value(PruneConfig, 'target', doc.pop('target'), where))
    if 'kd_alpha' in doc:
        search.setdefault('kd_alpha', check_value(SearchSettings, 'kd_alpha', doc.pop('kd_alpha'), where))
    if search:
        prune['search'] = search
    if prune or 'prune' in doc:
        doc['prune'] = prune
    return doc
