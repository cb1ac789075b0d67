"""The pruning method as one object with five stages, which :func:`amap.prune` and the ``amap prune`` pipeline both
drive (docs/amap-method.md, section 8)::

    job = StagedPruning(model, input_size, config)
    job.prepare()              # install the indicators; calibrate the latency model (latency targets); resolve and
                               # check the target
    job.calibrate(batches)     # similarity weights, linear-attention initialisation (amap criterion, as switched)
    job.search(loader)         # the indicator search (amap criterion only; resumable, see below)
    job.finalize()             # the structure at the target: target guarantee, or a baseline criterion's scores
    structure = job.cut()      # latency targets: measure the cut structure, tighten while it misses; surgery

Resumable state, stage by stage: calibration is recomputed from the same batches (deterministic); the search is a
:class:`~amap.prune.search.Search` whose ``state_dict`` can be saved between any two steps (``restore`` hands the
fresh loop to a loader of that state); the cut model with its structure, history and target is an artifact
(:meth:`StagedPruning.save_cut` / :func:`load_cut`, the pipeline's ``pruned_init``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.distributed import broadcast_object, is_main_process
from .attn_init import attention_difference_init
from .config import PruneConfig, resolve_cost_target
from .criteria import criterion_structure
from .criterion_init import criterion_init
from .pruner import Pruner
from .resource import Resource
from .search import Search
from .similarity import calibrate_similarity
from .surgery import apply_surgery, describe_structure
from .target import check_target, fit_to_target, uniform_counts

# a cached latency calibration is timed again when the closed loop measures the unpruned model this far (relative)
# from the cache's time: FLatten-Swin-T at batch 32, cached under other load, ran 31% faster and its cut models missed
# by 27-33% (the loop then overshot to 1.48x for 1.3x)
STALE_CALIBRATION = 0.15

__all__ = ['StagedPruning', 'CutModel', 'load_cut', 'prepare', 'calibrate', 'finalize_structure', 'rewind']

Batches = list[tuple[Tensor, Tensor]]


def install(model: nn.Module, input_size: tuple[int, int, int], cfg: PruneConfig) -> Pruner:
    """Install the indicators (and reweights, for the amap criterion) on ``model``, as the config switches say."""
    return Pruner(model, input_size, kinds=cfg.kinds, head_balance=cfg.head_balance,
                  reweight=cfg.reweight and cfg.searches, threshold=cfg.threshold, min_keep=cfg.min_keep)


def calibrate(pruner: Pruner, cfg: PruneConfig, calib: Batches, target: float | None = None) -> None:
    """For the amap criterion: initialise the indicators (attention difference, or a criterion's structure at
    ``target``, in the pruner's resource units) and fold in the similarity weights -- each as the config says."""
    if not cfg.searches:
        return
    if cfg.attn_init:
        attention_difference_init(pruner, calib[0][0], spread=cfg.attn_init_spread, low=cfg.attn_init_low,
                                  seed=cfg.seed)
    if cfg.similarity:
        calibrate_similarity(pruner, (x for x, _ in calib), beta=cfg.similarity_beta)
    if cfg.indicator_init != 'constant':
        if target is None:
            raise ValueError(f'indicator_init={cfg.indicator_init!r} needs the target')
        criterion_init(pruner, target, calib, criterion=cfg.indicator_init, margin=cfg.init_margin,
                       multiple=final_multiple(pruner, cfg), seed=cfg.seed)


def prepare(model: nn.Module, input_size: tuple[int, int, int], cfg: PruneConfig, calib: Batches) -> Pruner:
    """:func:`install` then :func:`calibrate` (a MAC target): the pruner ready to search."""
    pruner = install(model, input_size, cfg)
    seeded = cfg.indicator_init != 'constant'
    calibrate(pruner, cfg, calib, resolve_cost_target(cfg, pruner.resource.full) if seeded else None)
    return pruner


def final_multiple(pruner: Pruner, cfg: PruneConfig) -> int:
    """The multiple every final width keeps: ``channel_multiple`` and the step the resource rewards."""
    return math.lcm(cfg.channel_multiple, pruner.resource.step)


def finalize_structure(pruner: Pruner, cfg: PruneConfig, target_macs: float, calib: Batches) -> None:
    """Fix the final structure at the target (in the pruner's resource units): the target guarantee on the searched
    indicators (amap), or the baseline criterion's scores under the same constraints."""
    multiple = final_multiple(pruner, cfg)
    if cfg.searches:
        for ind in pruner.indicators.values():
            ind.fold_ramp()  # the search's ramp gate (if on) carries over into the reweights
        counts = None
        if not cfg.head_balance:
            # the physical model needs balanced heads: every head keeps the layer's mean count of the search
            counts = {k: torch.full_like(c, max(1, round(float(c.float().mean()))))
                      for k, c in pruner.hard_counts().items()}
            for ind in pruner.indicators.values():
                ind.head_balance = True
        fit_to_target(pruner, target_macs, counts=counts, fill=cfg.fill, multiple=multiple,
                      per_mac=cfg.trim_by_cost)
        return
    criterion_structure(cfg.criterion, pruner, target_macs, batches=calib, seed=cfg.seed, fill=cfg.fill,
                        multiple=multiple)


@torch.no_grad()
def rewind(pruner: Pruner, original: dict[str, Tensor]) -> None:
    """Put the unpruned model's weights (``original``, its state dict before the indicators were installed) back
    under the fixed structure and reset every reweight to 1, so the cut keeps the searched structure alone."""
    model = pruner.model[0]
    unexpected = model.load_state_dict(original, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f'cut_weights=original: the installed model lost {unexpected[:3]} of the original')
    for ind in pruner.indicators.values():
        if ind.reweight is not None:
            ind.reweight.fill_(1.0)


def calibrate_resource(pruner: Pruner, cfg: PruneConfig, *, progress: bool = True, refresh: bool = False) -> None:
    """Give the pruner the resource the config's target counts: MACs (already there), or a latency model calibrated
    on this device (:func:`amap.latency.calibrate_latency`; cached, timed again with ``refresh``). Under DDP rank 0
    calibrates and every rank uses its model, so that all select the same structure."""
    if cfg.resource == 'latency':
        from ..latency import LatencyModel, calibrate_latency
        lat = calibrate_latency(
            pruner, batch=cfg.latency_batch, threads=cfg.latency_threads, backend=cfg.latency_backend,
            rounds=cfg.latency_calib_rounds, cache=cfg.latency_cache, refresh=refresh, progress=progress,
            seed=cfg.seed) if is_main_process() else None
        shared = broadcast_object(lat.to_dict() if lat is not None else None)
        pruner.resource = lat if lat is not None else LatencyModel.from_dict(shared)
        pruner.resource.smooth = 'fit' if cfg.latency_search == 'fit' else 'table'


@dataclass
class CutModel:
    """The outcome of the last stage: the physically smaller model and what led to it (``latency``: the closed
    loop's predicted and measured latency, for a latency target)."""

    model: nn.Module
    structure: list[dict]
    history: list[dict]
    target_macs: float
    latency: dict[str, Any] | None = None


def load_cut(folder: str | Path, *, device: torch.device | str = 'cpu') -> CutModel:
    """A :class:`CutModel` saved by :meth:`StagedPruning.save_cut`."""
    from .artifact import load_pruned, read_pruned_config
    config = read_pruned_config(folder)
    return CutModel(model=load_pruned(folder, device=device), structure=config['structure'],
                    history=config['extra'].get('history', []), target_macs=config['extra']['target_macs'],
                    latency=config['extra'].get('latency'))


class StagedPruning:
    """Prune ``model`` in place, stage by stage (see the module docstring); each stage checks the one before it ran.

    Args:
        model: The trained model (modified in place).
        input_size: ``(C, H, W)`` of one input.
        config: The method's options.
        progress: A progress bar while calibrating a latency model (on a terminal).

    Attributes:
        pruner: The pruner (after :meth:`prepare`).
        target: The target in the pruner's resource units: MACs, or ms per batch (after :meth:`prepare`).
        target_macs: The target in MACs; for a latency target, the MACs of the structure selected for it.
        latency: For a latency target, the closed loop's numbers (after :meth:`cut`).
        loop: The search loop (during and after :meth:`search`).
        history: Search records.
        structure: Per pruned module: widths per head and kept indices (after :meth:`cut`).
        seconds: Wall time of ``calibration`` (prepare + calibrate), ``latency_calibration`` (the latency model, in
            prepare), ``search``, ``surgery`` (finalize + cut) and ``latency_check`` (the closed loop, in cut).
    """

    STAGES = ('new', 'prepared', 'calibrated', 'searched', 'finalized', 'cut')

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int], config: PruneConfig, *,
                 progress: bool = True) -> None:
        self.model, self.input_size, self.config, self.progress = model, tuple(input_size), config, progress
        self.stage = 'new'
        self.pruner: Pruner | None = None
        self.mac_resource: Resource | None = None  # the pruner's MAC count, kept when a latency model replaces it
        self.target = self.target_macs = 0.0
        self.latency: dict[str, Any] | None = None
        self.calib: Batches = []
        self.loop: Search | None = None
        self.history: list[dict] = []
        self.structure: list[dict] = []
        self.seconds: dict[str, float] = {}
        self.original: dict[str, Tensor] | None = None  # the unpruned state, kept for cut_weights='original'

    def _enter(self, stage: str, *after: str) -> float:
        if self.stage not in after:
            raise RuntimeError(f'pruning stage {stage!r} needs one of {list(after)} first; this job is {self.stage!r}')
        return time.perf_counter()

    def _leave(self, stage: str, clock: str, t0: float) -> None:
        self.stage = stage
        self.seconds[clock] = self.seconds.get(clock, 0.0) + time.perf_counter() - t0

    def prepare(self) -> None:
        """Install the indicators, calibrate the latency model (a latency target) and resolve the target; an
        unreachable target fails here, before any search."""
        t0 = self._enter('prepare', 'new')
        if self.config.searches and self.config.cut_weights == 'original':  # the weights the cut starts from
            self.original = {k: v.detach().to('cpu', copy=True) for k, v in self.model.state_dict().items()}
        self.pruner = install(self.model, self.input_size, self.config)
        self.mac_resource = self.pruner.resource  # what a latency target's search follows with latency_search='macs'
        t1 = time.perf_counter()
        calibrate_resource(self.pruner, self.config, progress=self.progress)
        if self.config.resource != 'macs':
            self.seconds['latency_calibration'] = time.perf_counter() - t1
            t0 += time.perf_counter() - t1  # not counted twice
        self.target = resolve_cost_target(self.config, self.pruner.resource.full)
        self.target_macs = self.target if self.config.resource == 'macs' else self.pruner.full_macs
        check_target(self.pruner, self.target, final_multiple(self.pruner, self.config))
        self._leave('prepared', 'calibration', t0)

    def calibrate(self, batches: Batches) -> None:
        """Similarity weights and the linear-attention initialisation from ``batches`` (kept for :meth:`finalize`,
        whose baseline criteria score on them)."""
        t0 = self._enter('calibrate', 'prepared')
        self.calib = list(batches)
        calibrate(self.pruner, self.config, self.calib, self.target)
        self._leave('calibrated', 'calibration', t0)

    def search(
            self,
            loader: Iterable,
            *,
            teacher: nn.Module | None = None,
            device: torch.device | str = 'cpu',
            mixup_fn: Callable | None = None,
            grad_sync: Callable[[list[nn.Parameter]], None] | None = None,
            reduce: Callable[[Tensor], Tensor] | None = None,
            restore: Callable[[Search], None] | None = None,
            steps_per_epoch: int | None = None,
            progress: Callable[[dict], None] | None = None,
            on_step: Callable[[Search], None] | None = None,
            **settings: Any,
    ) -> list[dict]:
        """Run the search (a no-op for a baseline criterion); returns its history.

        Args:
            loader: Training batches ``(images, labels)``.
            teacher: Frozen original model for distillation (None: none).
            device: Device of the model.
            mixup_fn: Optional timm Mixup applied to each batch.
            grad_sync: Called after every backward (DDP gradient averaging).
            reduce: Averages logged losses over ranks (DDP).
            restore: Called with the fresh loop before it runs, e.g. to load a saved state into it.
            steps_per_epoch: Batches per epoch (default ``len(loader)``).
            progress: Called with every logged record.
            on_step: Called after every step, e.g. to save the loop's state.
            **settings: :class:`~amap.prune.search.SearchSettings` fields replacing the config's for this run
                (``steps``, ``accum_steps``, ``amp``).
        """
        t0 = self._enter('search', 'calibrated')
        if not self.config.searches:
            self.stage = 'searched'
            return self.history
        resource, target, on_macs = self.pruner.resource, self.search_target(), self._searches_on_macs
        if on_macs:
            self.pruner.resource = self.mac_resource  # the target guarantee and the closed loop read latency again
        try:
            self.loop = Search(self.pruner, target, dataclasses.replace(self.config.search, **settings),
                               teacher=teacher, device=device, mixup_fn=mixup_fn, grad_sync=grad_sync, reduce=reduce,
                               report=resource if on_macs else None)
            if restore is not None:
                restore(self.loop)
            self.history = self.loop.run(loader, steps_per_epoch=steps_per_epoch, progress=progress, on_step=on_step)
        finally:
            self.pruner.resource = resource
        self._leave('searched', 'search', t0)
        return self.history

    def search_target(self) -> float:
        """The target the search follows, in its resource's units: :attr:`target`, or with ``latency_search='macs'``
        the MACs of the uniform structure (every group at the same kept ratio) that meets the latency target."""
        if not self._searches_on_macs:
            return self.target
        counts = uniform_counts(self.pruner, self.target, final_multiple(self.pruner, self.config))
        return float(self.pruner.macs(counts))

    @property
    def _searches_on_macs(self) -> bool:
        """A latency target whose search follows MACs (``latency_search='macs'``)."""
        return self.config.resource == 'latency' and self.config.latency_search == 'macs'

    def finalize(self) -> None:
        """Fix the structure at the target (see :func:`finalize_structure`)."""
        t0 = self._enter('finalize', 'searched')
        finalize_structure(self.pruner, self.config, self.target, self.calib)
        if self.original is not None:
            rewind(self.pruner, self.original)
        self._leave('finalized', 'surgery', t0)

    def cut(self) -> list[dict]:
        """Surgery: remove the pruned channels, fold the reweights; returns the structure. For a latency target the
        structure is measured on the device first and tightened while it misses (:mod:`amap.latency.closed_loop`)."""
        t0 = self._enter('cut', 'finalized')
        if self.config.resource == 'latency':
            self._close_loop()
            t0 = time.perf_counter()  # the loop has its own clock
        self.structure = describe_structure(self.pruner)
        apply_surgery(self.pruner)
        self._leave('cut', 'surgery', t0)
        return self.structure

    def save_cut(self, folder: str | Path, *, architecture: str | None,
                 model_kwargs: dict[str, Any] | None) -> Path:
        """Save the cut model with its structure, search history and target (read back by :func:`load_cut`)."""
        from .artifact import save_pruned
        self._enter('save_cut', 'cut')
        extra = {'history': self.history, 'target_macs': self.target_macs}
        if self.latency is not None:
            extra['latency'] = self.latency
        return save_pruned(self.model, folder, architecture=architecture, model_kwargs=model_kwargs,
                           structure=self.structure, extra=extra)

    def result(self) -> CutModel:
        """The :class:`CutModel` of a job that ran :meth:`cut`."""
        self._enter('result', 'cut')
        return CutModel(model=self.model, structure=self.structure, history=self.history,
                        target_macs=self.target_macs, latency=self.latency)

    def _close_loop(self) -> None:
        """Measure the selected structure against the unpruned model; select again while it is off the target."""
        from ..latency.closed_loop import close_loop
        from .target import apply_counts, fit_to_target

        t0, cfg, pruner = time.perf_counter(), self.config, self.pruner
        # the kept channels first (the structure selected), the search's scores rank the rest and break ties
        scores = {k: ind.hard_mask().float() + 1e-3 * _unit(ind.scores().detach().float())
                  for k, ind in pruner.indicators.items()}

        def select(target: float | None, counts: dict[str, Tensor] | None) -> None:
            if counts is not None:
                apply_counts(pruner, counts, scores)
            else:
                fit_to_target(pruner, target, scores=scores, counts=pruner.hard_counts(), fill=cfg.fill,
                              multiple=final_multiple(pruner, cfg), per_mac=cfg.trim_by_cost)

        def loop() -> dict[str, Any] | None:
            if not is_main_process():  # under DDP rank 0 measures and every rank takes its structure
                return None
            return close_loop(pruner, self.target, select, batch=cfg.latency_batch, threads=cfg.latency_threads,
                              backend=cfg.latency_backend, rounds=cfg.latency_calib_rounds, seed=cfg.seed)

        self.latency = loop()
        drift = broadcast_object(self.latency['measured_before_ms'] / pruner.resource.full - 1
                                 if self.latency is not None else None)
        cached = pruner.resource.meta.get('cached')
        if cached and abs(drift) > STALE_CALIBRATION:
            # the cached tables were timed while the machine ran differently (another load, clock or thermal state):
            # the ops do not slow down alike, so the ratios the cache predicts are off; time them again and select anew
            first = self.latency
            t1 = time.perf_counter()
            calibrate_resource(pruner, cfg, progress=self.progress, refresh=True)
            spent = time.perf_counter() - t1
            self.seconds['latency_calibration'] = self.seconds.get('latency_calibration', 0.0) + spent
            t0 += spent  # not counted twice
            self.target = resolve_cost_target(cfg, pruner.resource.full)
            select(self.target, None)
            self.latency = loop()
            if self.latency is not None:
                self.latency['recalibrated'] = {'stale_cache': cached, 'drift': drift, 'first_loop': first}
        mine = (self.latency, {k: c.tolist() for k, c in pruner.hard_counts().items()})
        self.latency, counts = broadcast_object(mine)
        if not is_main_process():
            select(None, {k: torch.tensor(c) for k, c in counts.items()})
        self.target_macs = pruner.hard_macs()
        self.seconds['latency_check'] = time.perf_counter() - t0


def _unit(x: Tensor) -> Tensor:
    """``x`` scaled into [0, 1]."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
