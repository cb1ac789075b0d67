"""The configuration has one source: the ``amap prune`` flags, their defaults and help are read off the config
dataclasses; YAML files and flags of earlier versions still give the same job; the pruning stages run in order."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from amap.cli import build_parser
from amap.errors import ConfigError
from amap.pipeline import PipelineConfig, load_config
from amap.prune import PruneConfig, SearchSettings
from amap.prune.criteria import CRITERIA
from amap.utils.config import add_dataclass_arguments, field_docs, given_options


def _prune_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices['prune']


def _parsed(*argv: str) -> PipelineConfig:
    args = _prune_parser().parse_args(list(argv))
    return load_config(args.config, **given_options(args, PipelineConfig))


def test_prune_flags_come_from_the_dataclass_fields():
    actions = {a.dest: a for a in _prune_parser()._actions}
    # every search setting but those amap prune sets itself is a flag, with the field's docstring and default
    for f in dataclasses.fields(SearchSettings):
        if f.name in ('steps', 'accum_steps', 'amp'):
            assert f'prune.search.{f.name}' not in actions
            continue
        action = actions[f'prune.search.{f.name}']
        assert field_docs(SearchSettings)[f.name].replace('%', '%%') in action.help
        assert f'(default: {f.default})' in action.help, action.help
    assert tuple(actions['prune.criterion'].choices) == CRITERIA and 'taylor' in CRITERIA
    # nothing given: nothing overrides the config file
    assert given_options(_prune_parser().parse_args([]), PipelineConfig) == {}
    assert _parsed() == PipelineConfig()


def test_flags_of_earlier_versions_give_the_same_job():
    cfg = _parsed('--checkpoint', 'run', '-t', '0.6', '--search-steps', '10', '--search-lr', '0', '--kd-alpha', '0.3',
                  '--indicator-lr', '0.05', '--resource-lambda', '2', '--calib-batches', '2', '--no-similarity',
                  '--no-head-balance', '--no-reweight', '--attn-init', '--attn-init-low', '0.9', '--kinds', 'qk, v',
                  '--channel-multiple', '8', '--criterion', 'amap', '-b', '16', '-j', '0', '--train-subset', '64',
                  '--no-latency', '--no-progress', '--resume', '--teacher', 'none', '--accum-steps', '2')
    expected = PruneConfig(target=0.6, similarity=False, head_balance=False, reweight=False, attn_init=True,
                           attn_init_low=0.9, kinds=('qk', 'v'), channel_multiple=8, calib_batches=2,
                           search=SearchSettings(lr=0.0, kd_alpha=0.3, indicator_lr=0.05, resource_lambda=2.0))
    assert cfg.prune == expected
    assert (cfg.search_steps, cfg.data.batch_size, cfg.data.num_workers, cfg.data.train_subset) == (10, 16, 0, 64)
    assert (cfg.latency, cfg.progress, cfg.resume, cfg.teacher, cfg.accum_steps) == (False, False, True, 'none', 2)
    with pytest.raises(SystemExit):
        _prune_parser().parse_args(['--search-steps', '0'])


def test_config_written_by_an_earlier_version_gives_the_same_job(tmp_path):
    # the layout of config.yaml before the search settings were nested: target and kd_alpha at the top level
    old = tmp_path / 'old.yaml'
    old.write_text('checkpoint: runs/train\ntarget: 0.5\nkd_alpha: 0.25\nsearch_steps: 7\nweight_decay: 0.01\n'
                   'prune:\n  calib_batches: 2\n  lr: 0.0\n  indicator_lr: 0.05\n  kinds: [qk, v]\n')
    cfg = load_config(old)
    assert cfg.prune == PruneConfig(target=0.5, calib_batches=2, kinds=('qk', 'v'),
                                    search=SearchSettings(kd_alpha=0.25, lr=0.0, indicator_lr=0.05))
    assert (cfg.search_steps, cfg.weight_decay, cfg.kd_alpha) == (7, 0.01, 0.25)
    # the current layout, as a run writes it, reads back to the same job
    new = tmp_path / 'new.yaml'
    new.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert 'kd_alpha' not in yaml.safe_load(new.read_text())
    assert load_config(new) == cfg
    # a flag overrides a key of either layout
    assert load_config(old, prune={'target': 0.4, 'search': {'kd_alpha': 0.1}}).prune.target == 0.4
    assert load_config(old, prune={'search': {'kd_alpha': 0.1}}).kd_alpha == 0.1
    with pytest.raises(ConfigError, match=r"old\.yaml: kd_alpha must be a number, got 'x'"):
        load_config(_write(tmp_path, 'kd_alpha: x\n'))
    with pytest.raises(ConfigError, match='search_steps or search_epochs'):
        load_config(_write(tmp_path, 'prune:\n  search:\n    steps: 3\n'))


def _write(tmp_path, text: str):
    path = tmp_path / 'old.yaml'
    path.write_text(text)
    return path


def test_prune_config_takes_the_flat_search_settings_of_earlier_versions():
    assert PruneConfig(search_steps=5, lr=0, kd_alpha=0.2) == PruneConfig(search=SearchSettings(steps=5, lr=0.0,
                                                                                               kd_alpha=0.2))
    with pytest.raises(ConfigError, match='search_steps must be an integer or null'):
        PruneConfig(search_steps='many')


@dataclasses.dataclass
class Inner:
    """Inner.

    Attributes:
        rate: How fast. More text
            on a second line.
    """
    rate: float = 0.5


@dataclasses.dataclass
class Outer:
    """Outer.

    Attributes:
        name: Who, e.g. a friend. Not shown.
        kinds: Which kinds.
        on: A switch.
        count: How many.
        inner: Nested.
    """
    name: str = dataclasses.field(default='x', metadata={'choices': ('x', 'y'), 'flags': ('--who', '-w')})
    kinds: tuple[str, ...] = ('a', 'b')
    on: bool = True
    count: int | None = dataclasses.field(default=None, metadata={'min': 2})
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_add_dataclass_arguments_reads_types_choices_and_help():
    assert field_docs(Outer)['name'] == 'Who, e.g. a friend.'
    assert field_docs(Inner)['rate'] == 'How fast.'
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Outer)
    args = parser.parse_args(['-w', 'y', '--kinds', 'c,d', '--no-on', '--count', '3', '--rate', '2'])
    assert given_options(args, Outer) == {'name': 'y', 'kinds': ('c', 'd'), 'on': False, 'count': 3,
                                          'inner': {'rate': 2.0}}
    assert 'How fast. (default: 0.5)' in parser.format_help()
    for bad in (['--who', 'z'], ['--count', '1'], ['--rate', 'fast']):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices['train']


def _train_job(*argv: str):
    from amap.train import TrainConfig
    args = _train_parser().parse_args(list(argv))
    return TrainConfig.load(args.config, **given_options(args, TrainConfig))


def test_train_flags_come_from_the_dataclass_fields():
    from amap.data import DataConfig
    from amap.train import TrainConfig
    actions = {a.dest: a for a in _train_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name == 'data':
            continue
        assert field_docs(TrainConfig)[f.name].replace('%', '%%') in actions[f.name].help
    assert actions['data.num_workers'].option_strings == ['--workers', '-j']
    assert tuple(actions['data.augment'].choices) == ('none', 'basic', 'strong')
    assert 'data.mean' not in actions and 'data.label_smoothing' not in actions
    assert _train_job() == TrainConfig() and _train_job().data == DataConfig()


def test_train_flags_of_earlier_versions_give_the_same_job(tmp_path):
    from amap.data import DataConfig
    from amap.train import TrainConfig
    cfg = _train_job('-m', 'flatten_deit_micro', '--model-kwargs', '{"embed_dim": 96}', '--data', 'DIR', '--img-size',
                     '40', '-b', '16', '-j', '0', '--eval-batch-size', '8', '--augment', 'strong', '--randaugment',
                     'rand-m7', '--mixup', '0.2', '--cutmix', '0.1', '--train-subset', '50', '--val-subset', '20',
                     '--interpolation', 'bilinear', '--epochs', '3', '--lr', '2e-3', '--wd', '0.1', '--warmup-epochs',
                     '0.5', '--warmup-lr', '1e-5', '--min-lr', '1e-4', '--opt', 'sgd', '--sched', 'step', '--clip-grad',
                     '1', '--smoothing', '0.1', '--accum-steps', '2', '--seed', '3', '--max-steps', '7', '-o', 'X',
                     '--resume', '--overwrite', '--checkpoint-every', '5', '--eval-every', '2', '--log-every', '3',
                     '--no-progress', '--device', 'cpu', '--amp', 'on')
    data = DataConfig(data='DIR', img_size=40, batch_size=16, num_workers=0, eval_batch_size=8, augment='strong',
                      randaugment='rand-m7', mixup=0.2, cutmix=0.1, train_subset=50, val_subset=20,
                      interpolation='bilinear')
    assert cfg == TrainConfig(model='flatten_deit_micro', model_kwargs={'embed_dim': 96}, data=data, epochs=3, lr=2e-3,
                              weight_decay=0.1, warmup_epochs=0.5, warmup_lr=1e-5, min_lr=1e-4, opt='sgd',
                              sched='step', clip_grad=1.0, label_smoothing=0.1, accum_steps=2, seed=3, max_steps=7,
                              out_dir='X', resume=True, overwrite=True, checkpoint_every=5, eval_every=2, log_every=3,
                              progress=False, device='cpu', amp='on')
    assert _train_job('--resume', 'RUN').resume == 'RUN'
    with pytest.raises(SystemExit):
        _train_parser().parse_args(['--epochs', '0'])
    # a run started by an earlier version (smoothing given in both places) resumes under the same flags
    saved = TrainConfig(data=DataConfig(label_smoothing=0.1), label_smoothing=0.1).to_dict()
    _train_job('--smoothing', '0.1').check_resume(saved, tmp_path / 'run' / 'checkpoints' / 'step_1')
    with pytest.raises(ConfigError, match='label_smoothing=0.1, not 0.2'):
        _train_job('--smoothing', '0.2').check_resume(saved, tmp_path / 'run' / 'checkpoints' / 'step_1')


def test_train_config_file_with_flags_winning(tmp_path):
    path = tmp_path / 'train.yaml'
    path.write_text('model: flatten_deit_micro\nepochs: 4\ndata:\n  batch_size: 32\n  augment: none\n')
    cfg = _train_job('--config', str(path), '--epochs', '6', '-b', '8')
    assert (cfg.model, cfg.epochs, cfg.data.batch_size, cfg.data.augment) == ('flatten_deit_micro', 6, 8, 'none')
    path.write_text('out_dir: /tmp/elsewhere\n')
    with pytest.raises(ConfigError, match='leaves the current folder'):
        _train_job('--config', str(path))
    assert _train_job('--config', str(path), '--out', '/tmp/elsewhere').out_dir == '/tmp/elsewhere'
    path.write_text('epochz: 4\n')
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        _train_job('--config', str(path))
