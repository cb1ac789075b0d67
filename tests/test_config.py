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
