"""The checkpoint codec (amap.train.state): checkpoints of earlier versions still load, one folder format serves the
search state, rotation keeps the newest folders, and the epoch loop never checkpoints a step twice."""
from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from amap.errors import CheckpointError
from amap.train import (
    STATE_FORMAT,
    TrainState,
    latest_train_state,
    load_train_state,
    optimizer_from_files,
    optimizer_to_files,
    read_state,
    restore_rng_states,
    rng_states,
    save_train_state,
    tensors_under,
    write_state,
)
from amap.utils.io import read_json, read_safetensors


def _state(seed: int = 0) -> TrainState:
    """A small model and an AdamW that has taken two steps (moments and step counts to save)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return TrainState(model=model, optimizer=opt, step=7, epoch=1, batch_in_epoch=3, best_top1=12.5,
                      history=[{'event': 'eval', 'step': 4, 'top1': 12.5}])


def _write_v1(ckpt_dir: Path, state: TrainState, config: dict) -> Path:
    """The training-checkpoint writer of amap before the train package (frozen here, independent of the code under
    test): tensors ``model.*`` and ``optim.<i>.<name>``, a JSON document, a ``latest.json`` pointer."""
    sd = state.optimizer.state_dict()
    tensors = {f'model.{k}': v.contiguous() for k, v in state.model.state_dict().items()}
    scalars: dict = {}
    for idx, pstate in sd['state'].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f'optim.{idx}.{key}'] = value.contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd['param_groups']]
    tuples = sorted({k for g in sd['param_groups'] for k, v in g.items() if isinstance(v, tuple)})
    rng = {'python': [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
           'numpy': [x.tolist() if hasattr(x, 'tolist') else x for x in np.random.get_state()],
           'torch': torch.get_rng_state().tolist()}
    save_id = uuid.uuid4().hex
    doc = {'format': 'amap.train_state/1', 'id': save_id, 'step': state.step, 'epoch': state.epoch,
           'batch_in_epoch': state.batch_in_epoch, 'best_top1': state.best_top1, 'history': state.history,
           'optimizer': {'param_groups': groups, 'tuple_keys': tuples, 'scalars': scalars}, 'scheduler': None,
           'scaler': None, 'rng': [rng], 'world_size': 1, 'time': 0.0, 'config': config}
    name = f'step_{state.step:09d}'
    (ckpt_dir / name).mkdir(parents=True)
    save_file(tensors, str(ckpt_dir / name / 'state.safetensors'),
              metadata={'format': 'amap.train_state/1', 'id': save_id, 'step': str(state.step)})
    (ckpt_dir / name / 'state.json').write_text(json.dumps(doc))
    (ckpt_dir / 'latest.json').write_text(json.dumps({'step': state.step, 'dir': name, 'id': save_id,
                                                      'epoch': state.epoch, 'batch_in_epoch': state.batch_in_epoch}))
    return ckpt_dir / name


def _assert_same_state(a: TrainState, b: TrainState) -> None:
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa['param_groups'] == sb['param_groups']
    for idx in sa['state']:
        for key, value in sa['state'][idx].items():
            assert torch.equal(value, sb['state'][idx][key]), (idx, key)
    assert (a.step, a.epoch, a.batch_in_epoch, a.best_top1, a.history) == \
        (b.step, b.epoch, b.batch_in_epoch, b.best_top1, b.history)


def test_a_checkpoint_of_the_previous_version_loads_exactly(tmp_path):
    saved = _state(seed=1)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    folder = _write_v1(tmp_path / 'checkpoints', saved, config={'model': 'x'})
    torch.manual_seed(999)  # the RNG moves on; loading must put it back
    assert latest_train_state(tmp_path) == folder
    fresh = _state(seed=2)
    fresh.step = 0
    doc = load_train_state(folder, fresh)
    _assert_same_state(saved, fresh)
    assert doc['config'] == {'model': 'x'}
    assert torch.equal(torch.rand(3), expected_draw)


def test_the_writer_keeps_the_previous_layout(tmp_path):
    """Same file names, tensor names, format id and document keys as the previous version (so both directions of
    an upgrade keep resuming)."""
    state = _state()
    new = save_train_state(tmp_path / 'new', state, extra={'config': {'model': 'x'}})
    old = _write_v1(tmp_path / 'old', state, config={'model': 'x'})
    assert new.name == old.name and sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
    t_new, m_new = read_safetensors(new / 'state.safetensors')
    t_old, m_old = read_safetensors(old / 'state.safetensors')
    assert t_new.keys() == t_old.keys() and m_new.keys() == m_old.keys() and m_new['format'] == STATE_FORMAT
    d_new, d_old = read_json(new / 'state.json'), read_json(old / 'state.json')
    assert d_new.keys() == d_old.keys() and d_new['optimizer'] == d_old['optimizer']
    assert read_json(new.parent / 'latest.json').keys() == read_json(old.parent / 'latest.json').keys()


def test_write_state_rotates_and_refuses_mixed_pairs(tmp_path):
    for step in (1, 2, 3):
        write_state(tmp_path, step=step, tensors={'w': torch.full((2,), float(step))}, doc={'note': step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['latest.json', 'step_000000002', 'step_000000003']
    tensors, doc = read_state(latest_train_state(tmp_path))
    assert doc['note'] == 3 and doc['step'] == 3 and torch.equal(tensors['w'], torch.full((2,), 3.0))
    (tmp_path / 'step_000000003' / 'state.json').write_text((tmp_path / 'step_000000002' / 'state.json').read_text())
    with pytest.raises(CheckpointError, match='do not belong together'):
        read_state(tmp_path / 'step_000000003')


def test_optimizers_under_prefixes_and_rng_round_trip(tmp_path):
    """Two optimizers in one folder (as the search state holds them), and this rank's RNG states restored."""
    a, b = _state(seed=3), _state(seed=4)
    tensors, doc = {}, {}
    for name, st in (('opt', a), ('opt_ind', b)):
        t, doc[name] = optimizer_to_files(st.optimizer, prefix=f'{name}.optim')
        tensors.update(t)
    tensors.update({f'model.{k}': v for k, v in a.model.state_dict().items()})
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    write_state(tmp_path, step=3, tensors=tensors, doc=doc)
    torch.rand(10)
    tensors, doc = read_state(latest_train_state(tmp_path))
    restore_rng_states(doc)
    assert torch.equal(torch.rand(4), expected)
    for name, st in (('opt', a), ('opt_ind', b)):
        restored = optimizer_from_files(tensors, doc[name], prefix=f'{name}.optim')
        for idx, values in st.optimizer.state_dict()['state'].items():
            assert torch.equal(restored['state'][idx]['exp_avg'], values['exp_avg'])
    assert tensors_under(tensors, 'model').keys() == a.model.state_dict().keys()


def test_a_search_state_of_the_previous_version_is_read(tmp_path):
    """The search state used to be one folder (no format id, one RNG state); resuming such a run still works."""
    st = _state(seed=6)
    tensors, meta = optimizer_to_files(st.optimizer, prefix='opt_ind.optim')
    torch.manual_seed(8)
    expected = torch.rand(2)
    torch.manual_seed(8)
    doc = {'step': 4, 'history': [], 'rng': rng_states(), 'scaler': {}, 'opt_ind': meta}
    folder = tmp_path / 'search_state'
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / 'state.safetensors'))
    (folder / 'state.json').write_text(json.dumps(doc))
    torch.rand(3)
    assert latest_train_state(folder) == folder
    read_tensors, read_doc = read_state(folder)
    assert read_doc['step'] == 4 and read_tensors.keys() == tensors.keys()
    restore_rng_states(read_doc)
    assert torch.equal(torch.rand(2), expected)


def _digits_loop(tmp_path: Path, **kw) -> tuple:
    """An EpochLoop over 64 digits images in batches of 16 (4 updates per epoch) with a linear model."""
    from amap.data import DataConfig, build_loaders
    from amap.train import EpochLoop, TrainConfig, build_train_state, default_loss_fn
    from amap.utils.distributed import DistInfo

    data = build_loaders(DataConfig(data='digits', img_size=16, batch_size=16, train_subset=64, val_subset=16,
                                    num_workers=0), seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, data.num_classes))
    state = build_train_state(model, TrainConfig(epochs=2, lr=1e-2, amp='off'), updates_per_epoch=4,
                              info=DistInfo())
    loop = EpochLoop(state, data, epochs=2, compute_loss=default_loss_fn(torch.nn.CrossEntropyLoss()),
                     ckpt_dir=tmp_path, info=DistInfo(), keep=10, **kw)
    return loop, state


def test_the_epoch_loop_checkpoints_each_step_once(tmp_path, monkeypatch):
    """Every ``checkpoint_every`` updates inside an epoch and at every epoch end, never twice for one step (step 4
    is both); ``max_steps`` stops inside an epoch with a checkpoint there and no end-of-epoch result."""
    import amap.train.epochs as epochs_mod
    saved: list[tuple[int, int]] = []
    real = epochs_mod.save_train_state

    def counting(ckpt_dir, state, **kw):
        saved.append((state.step, state.epoch))
        return real(ckpt_dir, state, **kw)

    monkeypatch.setattr(epochs_mod, 'save_train_state', counting)
    loop, state = _digits_loop(tmp_path / 'full', checkpoint_every=2)
    ends = []
    assert loop.run(lambda: ends.append(state.step) or 'evaluated') == 'evaluated'
    assert ends == [4, 8] and saved == [(2, 0), (4, 1), (6, 1), (8, 2)]
    saved.clear()
    loop, state = _digits_loop(tmp_path / 'short', max_steps=5)
    assert loop.run(lambda: 'evaluated') is None
    assert saved == [(4, 1), (5, 1)] and state.batch_in_epoch == 1
