"""The method's components against hand-computed examples, and every ablation switch doing what it says."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import build

from amap.errors import ConfigError
from amap.prune import PruneConfig, StagedPruning, prune
from amap.prune.api import prepare
from amap.prune.attn_init import focus, qk_attention_difference, v_output_difference
from amap.prune.groups import ChannelGroup
from amap.prune.indicator import ChannelIndicator
from amap.prune.similarity import GramRecorder, similarity_weights

# ----------------------------------------------------------------------------------------------- similarity weights


def test_similarity_weights_hand_computed():
    # one head, three channels over four tokens: c0 == c1 (fully redundant), c2 orthogonal to both
    x = torch.tensor([[1., 1., 0.], [0., 0., 1.], [1., 1., 0.], [0., 0., 1.]])
    rec = GramRecorder({'blk.v': (1, 3)})
    rec('blk.v', x, 'v')
    w = similarity_weights(rec, beta=0.3)['blk.v']
    # |S| = [[1,1,0],[1,1,0],[0,0,1]] -> r = [0.5, 0.5, 0] -> w = 1 - 0.3 * r / 0.5
    torch.testing.assert_close(w, torch.tensor([[0.7, 0.7, 1.0]]), atol=1e-6, rtol=0)


def test_similarity_averages_q_and_k_and_respects_heads():
    rec = GramRecorder({'blk.qk': (2, 2)})
    q = torch.tensor([[1., 0., 1., 1.], [0., 1., 2., 2.]])  # head 0: orthogonal channels; head 1: parallel
    k = torch.tensor([[1., 1., 1., 0.], [1., 1., 0., 1.]])  # head 0: parallel; head 1: orthogonal
    rec('blk.qk', q, 'q')
    rec('blk.qk', k, 'k')
    w = similarity_weights(rec, beta=0.3)['blk.qk']
    # each head: r = mean of (0, 1) = 0.5 for both channels -> equal redundancy -> w = 1
    torch.testing.assert_close(w, torch.ones(2, 2), atol=1e-6, rtol=0)
    rec2 = GramRecorder({'blk.qk': (2, 2)})
    rec2('blk.qk', q[:, 2:], 'q', 1)  # a branch covering head 1 only lands in head 1
    assert rec2.grams[('blk.qk', 'q')][0].abs().sum() == 0
    assert rec2.grams[('blk.qk', 'q')][1].abs().sum() > 0

# -------------------------------------------------------------------------------------- attention-difference init


def test_attention_difference_hand_computed():
    q = torch.tensor([[[1., 2.]]])            # one query, one head of 2 channels
    k = torch.tensor([[[1., 0.], [0., 1.]]])  # two keys
    d = qk_attention_difference(q, k, heads=1, p=1.0)  # p = 1: the focusing power is the identity
    # A = [1, 2] / 3; without c0: [0, 1]; without c1: [1, 0]
    expected = torch.tensor([[math.sqrt(2 / 5), math.sqrt(8 / 5)]])
    torch.testing.assert_close(d, expected, atol=1e-6, rtol=0)


def test_focus_recomputes_norms_without_the_removed_channel():
    x = torch.tensor([[3., 4.]])
    y = focus(x, 3.0)
    assert y.norm() == pytest.approx(5.0)  # norm-preserving
    assert (y[0, 1] / y[0, 0]) == pytest.approx((4 / 3) ** 3)
    torch.testing.assert_close(focus(x * torch.tensor([0., 1.]), 3.0), torch.tensor([[0., 4.]]))


def test_v_output_difference_is_the_channel_share():
    o = torch.tensor([[3., 0., 0., 4.]])  # two heads of two channels
    torch.testing.assert_close(v_output_difference(o, heads=2), torch.tensor([[0.6, 0.0], [0.0, 0.8]]))

# ------------------------------------------------------------------------------------------ indicator and balance


def test_head_balance_keeps_equal_counts():
    group = ChannelGroup('blk', 'qk', num_heads=2, dim=4)
    init = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.9, 0.1, 0.1, 0.1]])  # 5 channels above 0.5
    balanced = ChannelIndicator(group, init=init, head_balance=True)
    assert balanced.counts().tolist() == [2, 2]  # round(5 / 2) per head
    mask = balanced.hard_mask()
    assert mask.sum(-1).tolist() == [2, 2]
    assert mask[0].tolist() == [1, 1, 0, 0]  # each head keeps its own top-2 by score
    assert mask[1, 0] == 1
    free = ChannelIndicator(group, init=init, head_balance=False)
    assert free.counts().tolist() == [4, 1]


def test_straight_through_gradient_reaches_the_indicator():
    group = ChannelGroup('blk', 'mlp', num_heads=1, dim=3)
    ind = ChannelIndicator(group, init=torch.tensor([[0.9, 0.2, 0.7]]))
    ind.similarity_weight.copy_(torch.tensor([[1.0, 1.0, 0.5]]))
    mask = ind.mask()
    assert mask.tolist() == [[1.0, 0.0, 0.0]]  # s = w * m = [0.9, 0.2, 0.35]
    (mask * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    torch.testing.assert_close(ind.m.grad, torch.tensor([[1.0, 2.0, 1.5]]))  # d/dm = upstream * w


def test_indicator_reads_state_saved_before_the_similarity_weight_rename():
    group = ChannelGroup('blk', 'mlp', num_heads=1, dim=3)
    old = {'m': torch.full((1, 3), 0.8), 'weight': torch.tensor([[1.0, 0.7, 0.9]]), 'fixed': torch.empty(0),
           'reweight': torch.ones(1, 3)}
    ind = ChannelIndicator(group)
    ind.load_state_dict(old)
    assert ind.similarity_weight.tolist() == [[1.0, 0.699999988079071, 0.8999999761581421]]
    assert 'similarity_weight' in ind.state_dict() and 'weight' not in ind.state_dict()

# ----------------------------------------------------------------------------------------------- ablation switches


def _calib():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]


def _state(pruner):
    return {k: (ind.m.detach().clone(), ind.similarity_weight.clone(), ind.reweight is not None, ind.head_balance)
            for k, ind in pruner.indicators.items()}


@pytest.mark.parametrize('switch', ['similarity', 'attn_init', 'reweight', 'head_balance'])
def test_each_switch_changes_only_its_component(switch):
    on = {'attn_init': True}  # every component on (the init is off by default)
    full = _state(prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(**on), _calib()))
    off = _state(prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(**{**on, switch: False}), _calib()))
    assert full.keys() == off.keys()
    fields = {'attn_init': 0, 'similarity': 1, 'reweight': 2, 'head_balance': 3}
    linear_seen = False
    for key in full:
        for i, name in enumerate(fields):
            a, b = full[key][i], off[key][i]
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            if name != switch:
                assert same, f'{switch}=False changed {name} of {key}'
        if switch == 'attn_init':
            if key.endswith(('qk', '__v')):  # linear-attention groups: init spans [0.95, 1.05]
                linear_seen = True
                assert full[key][0].min() == pytest.approx(0.95) and full[key][0].max() == pytest.approx(1.05)
            assert torch.equal(off[key][0], torch.ones_like(off[key][0]))
        if switch == 'similarity':
            assert torch.equal(off[key][1], torch.ones_like(off[key][1]))
            assert full[key][1].min() >= 0.7 - 1e-6 and full[key][1].min() < 1
        if switch == 'reweight':
            assert full[key][2] and not off[key][2]
        if switch == 'head_balance':
            assert full[key][3] and not off[key][3]
    if switch == 'attn_init':
        assert linear_seen


def test_softmax_and_mlp_groups_are_not_attention_initialised():
    pruner = prepare(build('timm_deit'), (3, 32, 32), PruneConfig(similarity=False), _calib())
    assert all(torch.equal(ind.m, torch.ones_like(ind.m)) for ind in pruner.indicators.values())

def test_attention_difference_init_is_off_by_default():
    pruner = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(similarity=False), _calib())
    assert any(g.linear_attention for g in pruner.groups().values())
    assert all(torch.equal(ind.m, torch.ones_like(ind.m)) for ind in pruner.indicators.values())


def test_attention_init_ranks_within_heads_centred_on_the_common_start():
    """Default mapping: each head's channels start in [1 - spread/2, 1 + spread/2] in the order of their attention
    difference (mean 1, like every other group), may rise to that maximum, and all are kept at step 0."""
    from amap.prune.attn_init import centred_ranks
    d = torch.tensor([[0.3, 0.1, 0.2], [5.0, 7.0, 6.0]])
    torch.testing.assert_close(centred_ranks(d, 0.1), torch.tensor([[1.05, 0.95, 1.0], [0.95, 1.05, 1.0]]))
    pruner = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(attn_init=True), _calib())
    linear = [k for k, g in pruner.groups().items() if g.linear_attention]
    assert linear
    for key in linear:
        ind = pruner.indicators[key]
        assert ind.m.min().item() == pytest.approx(0.95) and ind.m.max().item() == pytest.approx(1.05)
        torch.testing.assert_close(ind.m.mean(-1), torch.ones(ind.m.shape[0]))
        assert ind.upper == pytest.approx(1.05)
        assert bool(ind.hard_mask().all())  # no channel is gated off before a gradient
    others = [ind for k, ind in pruner.indicators.items() if k not in linear]
    assert all(torch.equal(ind.m, torch.ones_like(ind.m)) and ind.upper == 1.0 for ind in others)


def test_attn_init_low_gives_the_papers_range_and_can_gate_channels_at_step_zero():
    calib = _calib()
    paper = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(attn_init=True, attn_init_low=0.55), calib)
    raised = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(attn_init=True, attn_init_low=0.75), calib)
    linear = [k for k, g in raised.groups().items() if g.linear_attention]
    assert linear
    for key in linear:
        m = raised.indicators[key].m
        assert m.min().item() == pytest.approx(0.75) and m.max().item() == pytest.approx(1.0)
        assert paper.indicators[key].m.min().item() == pytest.approx(0.55)
    # with similarity weights >= 0.7, [0.75, 1] keeps every channel at step 0; the paper's [0.55, 1] does not
    assert all(bool(raised.indicators[k].hard_mask().all()) for k in linear)
    assert not all(bool(paper.indicators[k].hard_mask().all()) for k in linear)
    with pytest.raises(ConfigError, match='attn_init_low'):
        PruneConfig(attn_init_low=0.0)
    with pytest.raises(ConfigError, match='attn_init_spread'):
        PruneConfig(attn_init_spread=1.5)


def test_taylor_init_starts_the_search_at_taylors_structure_at_the_target():
    """indicator_init='taylor': step 0 gates exactly the structure the Taylor criterion gives at the target (so the
    search starts at the target), kept channels start above the threshold and cut ones below, both within the margin
    and ordered within each head by the Taylor score; the indicators stay free to move."""
    from amap.prune.criteria import criterion_scores, criterion_structure
    from amap.prune.indicator import within_head_ranks
    torch.testing.assert_close(within_head_ranks(torch.tensor([[0.3, 0.1, 0.2]])), torch.tensor([[1.0, 0.0, 0.5]]))
    calib = _calib()
    cfg = PruneConfig(target=0.5, indicator_init='taylor', init_margin=0.2)
    torch.manual_seed(0)
    seeded = prepare(build('flatten_deit'), (3, 32, 32), cfg, calib)
    torch.manual_seed(0)
    ref = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(target=0.5), calib)
    taylor = criterion_scores('taylor', ref, batches=calib)
    criterion_structure('taylor', ref, 0.5 * ref.full_macs, scores=taylor)
    assert 0.45 < seeded.hard_macs() / seeded.full_macs <= 0.5
    for key, ind in seeded.indicators.items():
        assert not ind.fixed.numel()  # searching, not fixed
        assert torch.equal(ind.hard_mask(), ref.indicators[key].fixed)
        s, kept = ind.scores().detach(), ind.hard_mask().bool()
        assert bool((s[kept] > 0.6).all()) and bool((s[kept] <= 0.7 + 1e-6).all())
        assert bool((s[~kept] < 0.4).all()) and bool((s[~kept] >= 0.3 - 1e-6).all())
        order = taylor[key].argsort(-1)  # scores rise with the Taylor score within every head
        assert bool((s.gather(-1, order).diff(dim=-1) >= -1e-6).all())
        assert ind.m.requires_grad and ind.upper >= float(ind.m.detach().max()) - 1e-6
    with pytest.raises(ConfigError, match='attn_init off'):
        PruneConfig(indicator_init='taylor', attn_init=True)
    with pytest.raises(ConfigError, match='init_margin'):
        PruneConfig(init_margin=1.5)
    with pytest.raises(ConfigError, match='indicator_init'):
        PruneConfig(indicator_init='magic')


@pytest.mark.parametrize('reweight', [True, False])
def test_ramp_gate_fades_kept_channels_and_folds_exactly_into_the_reweights(reweight):
    """gate='ramp': the unpruned function at the start (m = 1), a kept channel halfway between its start and the
    threshold scaled by 1/2 where the reweights act, and after a few search steps the fold into the reweights (or,
    without the reweight module, into fixed scales) plus the fixed structure compute exactly what the searching model
    did."""
    from amap.prune.search import Search
    from amap.prune.surgery import apply_surgery
    from amap.prune.target import apply_counts
    torch.manual_seed(0)
    model = build('flatten_deit')
    cfg = PruneConfig(target=0.5, gate='ramp', reweight=reweight)
    pruner = prepare(model, (3, 32, 32), cfg, _calib())
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        plain = model(x)
    loop = Search(pruner, 0.5 * pruner.full_macs, dataclasses.replace(cfg.search, steps=6, lr=1e-3))
    assert all(ind.ramp for ind in pruner.indicators.values())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain)  # m = 1: every ramp factor is 1
    ind = next(iter(pruner.indicators.values()))
    with torch.no_grad():
        w = ind.similarity_weight[0, 0]
        ind.m[0, 0] = (ind.threshold + 0.5 * (w - ind.threshold)) / w
    assert float(ind.reweight_scale()[0, 0].detach()) == pytest.approx(0.5, abs=1e-5)
    ind.m.data.fill_(1.0)
    g = torch.Generator().manual_seed(1)
    loop.run([(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)])
    faded = [ind for ind in pruner.indicators.values()
             if bool((ind.reweight_scale() < (1.0 if ind.reweight is None else ind.reweight) - 1e-4).any())]
    assert faded  # some kept channels are on their way out
    model.eval()
    with torch.no_grad():
        searching = model(x)
        counts = pruner.hard_counts()
        for ind in pruner.indicators.values():
            ind.fold_ramp(floor=0.0)
            assert not ind.ramp and ind.reweight is not None
        apply_counts(pruner, counts)
        torch.testing.assert_close(model(x), searching, atol=1e-5, rtol=0)
        small = apply_surgery(pruner)  # and the physically smaller model too
        torch.testing.assert_close(small.eval()(x), searching, atol=1e-5, rtol=0)


def test_kd_search_loss_leaves_the_gates_alone_until_the_model_departs_from_the_original():
    """search_loss='kd': at the start the gated model computes the original's function, so the distillation
    gradient on every gate is zero (to rounding); the mixed loss (hard labels) pulls the gates. Without a teacher it
    is a one-line error."""
    from amap.prune.search import Search, SearchSettings
    x, y = _loader()[0]
    pull = {}
    for loss in ('kd', 'mixed'):
        torch.manual_seed(0)
        model = build('flatten_deit')
        pruner = prepare(model, (3, 32, 32), PruneConfig(gate='ramp'), _calib())
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        loop = Search(pruner, 0.5 * pruner.full_macs, SearchSettings(steps=4, lr=0.0, resource_lambda=0.0,
                                                                     search_loss=loss), teacher=teacher)
        loop.train_step(x, y)  # the gradients stay on the indicators until the next step
        pull[loss] = max(float(ind.m.grad.abs().max()) for ind in pruner.indicators.values())
    assert pull['kd'] < 1e-5 * pull['mixed'] and pull['mixed'] > 1e-4
    with pytest.raises(ConfigError, match='teacher'):
        Search(pruner, 0.5 * pruner.full_macs, SearchSettings(steps=4, search_loss='kd'))


def test_prunable_resource_scale_measures_the_excess_over_the_part_the_structure_can_change():
    """resource_scale='prunable': r = (R - R_min) / (R_target - R_min), so at the same step the resource loss pulls
    every indicator (T / (T - R_min))^2 times as hard as with the total ratio (the task's pull is the same)."""
    from amap.prune.search import Search, SearchSettings
    from amap.prune.target import min_cost
    x, y = _loader()[0]
    grads = {}
    for scale, lam in (('total', 0.0), ('total', 5.0), ('prunable', 5.0)):
        torch.manual_seed(0)
        pruner = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(gate='ramp'), _calib())
        target = 0.5 * pruner.full_macs
        loop = Search(pruner, target, SearchSettings(steps=4, lr=0.0, resource_lambda=lam, resource_scale=scale))
        loop.train_step(x, y)
        grads[scale, lam] = torch.cat([ind.m.grad.flatten() for ind in pruner.indicators.values()])
        floor = min_cost(pruner)
        assert loop.floor == (floor if scale == 'prunable' else 0.0) and 0 < floor < target
    pull_total = grads['total', 5.0] - grads['total', 0.0]
    pull_prunable = grads['prunable', 5.0] - grads['total', 0.0]
    assert pull_total.abs().max() > 0
    torch.testing.assert_close(pull_prunable, pull_total * (target / (target - floor)) ** 2, rtol=1e-4, atol=1e-9)


def test_cut_weights_original_cuts_the_searched_structure_from_the_original_weights():
    """cut_weights='original': the search (here with a large weight LR) only chooses the structure; the cut model
    holds the unpruned model's own weights, sliced to the kept channels, with no reweight folded in."""
    torch.manual_seed(0)
    original = build('flatten_deit')
    before = {k: v.clone() for k, v in original.state_dict().items()}
    results = {w: prune(copy.deepcopy(original), _loader(), target=0.5, cut_weights=w, search_steps=4, lr=1e-2)
               for w in ('original', 'search')}
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())  # the copies were pruned
    untouched = [k for k, v in results['original'].model.state_dict().items() if k in before and v.shape ==
                 before[k].shape and 'blocks' not in k]  # the stem, the last norm and the head are never pruned
    assert untouched
    for k in untouched:
        assert torch.equal(results['original'].model.state_dict()[k], before[k]), k
    assert any(not torch.equal(results['search'].model.state_dict()[k], before[k]) for k in untouched)
    for rec in results['original'].structure:
        if 'mlp' in rec['indices']:
            kept = torch.tensor(rec['indices']['mlp'][0])
            mlp = results['original'].model.get_submodule(rec['module'])
            torch.testing.assert_close(mlp.fc1.weight, before[f"{rec['module']}.fc1.weight"][kept], rtol=0, atol=0)
            torch.testing.assert_close(mlp.fc2.weight, before[f"{rec['module']}.fc2.weight"][:, kept], rtol=0, atol=0)


def test_group_adam_keeps_gradient_sizes_within_a_group():
    """Adam moves every channel by about its learning rate; GroupAdam normalises the group as a whole, so a channel
    with 4x the gradient moves 4x as far."""
    from amap.prune.indicator_opt import indicator_optimizer
    moves = {}
    for name in ('adam', 'group_adam'):
        p = torch.nn.Parameter(torch.ones(1, 2))
        opt = indicator_optimizer(name, [p], 0.01)
        for _ in range(3):
            p.grad = torch.tensor([[1.0, 4.0]])
            opt.step()
        moves[name] = (1 - p.detach()).flatten().tolist()
    assert moves['adam'][1] == pytest.approx(moves['adam'][0], rel=1e-3)
    assert moves['group_adam'][1] == pytest.approx(4 * moves['group_adam'][0], rel=1e-3)
    with pytest.raises(ConfigError, match='indicator optimiser'):
        indicator_optimizer('lion', [p], 0.01)


def test_dual_control_raises_its_multiplier_above_the_target_and_resumes_it():
    from amap.prune.search import Search, SearchSettings
    pruner = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(similarity=False), _calib())
    settings = SearchSettings(steps=6, lambda_warmup=0.3, resource_control='dual', lr=0.0, log_every=1)
    loop = Search(pruner, 0.5 * pruner.full_macs, settings)
    x, y = _loader()[0]
    for _ in range(2):
        loop.train_step(x, y)
    assert loop.mu > 0  # after the 2-step warm-up, far above the target
    assert [h['mu'] for h in loop.history][0] == 0.0
    state = loop.state_dict()
    again = Search(pruner, 0.5 * pruner.full_macs, settings)
    again.load_state_dict(state)
    assert again.mu == loop.mu
    penalty = Search(pruner, 0.5 * pruner.full_macs, SearchSettings(steps=6, lr=0.0))
    penalty.train_step(x, y)
    penalty.train_step(x, y)
    assert penalty.mu == 0.0


def test_cosine_indicator_schedule_decays_the_indicator_lr_to_zero():
    from amap.prune.search import Search, SearchSettings
    pruner = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(similarity=False), _calib())
    cosine = Search(pruner, 0.5 * pruner.full_macs, SearchSettings(steps=4, lr=0.0, indicator_schedule='cosine'))
    assert [cosine.indicator_lr_at(k) for k in range(4)] == pytest.approx([0.02, 0.01 * (1 + 2 ** -0.5), 0.01,
                                                                        0.01 * (1 - 2 ** -0.5)])
    x, y = _loader()[0]
    for k in range(3):
        before = pruner.indicators[next(iter(pruner.indicators))].m.detach().clone()
        cosine.train_step(x, y)
        assert cosine.opt_ind.param_groups[0]['lr'] == pytest.approx(cosine.indicator_lr_at(k))
    moved = (pruner.indicators[next(iter(pruner.indicators))].m.detach() - before).abs().max().item()
    assert 0 < moved <= cosine.indicator_lr_at(2) * 1.01  # Adam's step is at most about its learning rate
    constant = Search(pruner, 0.5 * pruner.full_macs, SearchSettings(steps=4, lr=0.0))
    assert {constant.indicator_lr_at(k) for k in range(4)} == {0.02}


# --------------------------------------------------------------------------------------------------- prune() API


def _loader():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]


@pytest.mark.parametrize('target', [0.5, 0.7])
def test_prune_reaches_target_and_is_deterministic(target):
    # 12 steps: Adam moves an indicator by about its LR per step, so 0.05 lets indicators started at 1 cross 0.5
    kw = dict(search_steps=12, calib_batches=2, log_every=4, indicator_lr=0.05)
    a = prune(build('flatten_deit'), _loader(), target, **kw)
    b = prune(build('flatten_deit'), _loader(), target, **kw)
    assert target - 0.01 <= a.ratio <= target
    assert a.structure == b.structure
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    assert [h['step'] for h in a.history] == [0, 4, 8, 11]
    assert a.history[-1]['mac_ratio'] < a.history[0]['mac_ratio']  # the resource loss pushed the structure down
    assert a.params_after < a.params_before


@pytest.mark.parametrize('criterion', ['magnitude', 'magnitude_l2', 'taylor', 'random', 'uniform', 'taylor_uniform'])
def test_baseline_criteria_share_the_constraints(criterion):
    res = prune(build('flatten_swin'), _loader(), 0.6, criterion=criterion, calib_batches=2)
    assert 0.6 * 0.99 <= res.ratio <= 0.6  # every method lands within 1% of the target, the uniform ones too
    kinds = {kind for rec in res.structure for kind in rec['widths'] if kind != 'dwc_shared'}
    assert kinds == {'qk', 'v', 'mlp'}  # every group kind was pruned under the same structure constraints
    for rec in res.structure:  # head-balanced: one width per kind, as many indices per head
        for kind, idx in rec['indices'].items():
            assert all(len(row) == rec['widths'][kind] >= 1 for row in idx)


def test_global_allocation_ranks_scores_not_scores_per_mac():
    """Global allocation by score (``per_mac=False``: Torch-Pruning's normalised scores, and AMAP's default trim)
    removes the channels of lowest score, whatever they cost; ``per_mac=True`` removes the least score per MAC saved."""
    from amap.prune.target import fit_to_target
    pruner = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(similarity=False), _calib())
    full = {k: torch.full((ind.group.num_heads,), ind.group.dim) for k, ind in pruner.indicators.items()}
    full_macs = float(pruner.macs(full))

    def step_cost(k):  # MACs saved by one channel less in every head of group k
        return full_macs - float(pruner.macs({**full, k: full[k] - 1}))

    step = {k: step_cost(k) for k in full}
    per_channel = {k: step[k] / len(full[k]) for k in full}
    a, b = min(per_channel, key=per_channel.get), max(per_channel, key=per_channel.get)
    assert per_channel[b] > 1.5 * per_channel[a]
    ratio = (per_channel[b] / per_channel[a]) ** 0.5  # b's channels score higher than a's, but lower per MAC
    scores = {k: torch.full(ind.m.shape, {a: 1.0, b: ratio}.get(k, 100.0)) for k, ind in pruner.indicators.items()}
    target = full_macs - min(step[a], step[b])  # one step of either group meets it
    glob = fit_to_target(pruner, target, scores=scores, counts=full, fill=False, per_mac=False)
    assert (glob[a] == full[a] - 1).all() and torch.equal(glob[b], full[b])
    per_mac = fit_to_target(pruner, target, scores=scores, counts=full, fill=False, per_mac=True)
    assert (per_mac[b] == full[b] - 1).all() and torch.equal(per_mac[a], full[a])

    # the pipeline's target guarantee after a search ranks the same way as PruneConfig.trim_rank says
    from amap.prune.staged import finalize_structure
    for rank, expected in (('score', glob), ('cost', per_mac), ('auto', per_mac)):  # auto: per MAC under MACs
        for k, ind in pruner.indicators.items():
            ind.fixed = torch.empty(0)  # searching again
            ind.m.data.copy_(scores[k])
        finalize_structure(pruner, PruneConfig(similarity=False, fill=False, trim_rank=rank), target, _calib())
        got = pruner.hard_counts()
        assert all(torch.equal(got[k], expected[k]) for k in full), rank
    with pytest.raises(ConfigError, match='trim_rank'):
        PruneConfig(trim_rank='mac')
    # the default ranks by score alone (the search already priced each channel); auto, the old default, ranks by
    # score under a latency target and per MAC under MACs
    assert not PruneConfig().trim_by_cost and not PruneConfig(resource='latency').trim_by_cost
    assert PruneConfig(trim_rank='auto').trim_by_cost
    assert not PruneConfig(resource='latency', trim_rank='auto').trim_by_cost
    assert PruneConfig(resource='latency', trim_rank='cost').trim_by_cost


def test_bad_targets_are_clear_errors():
    with pytest.raises(ConfigError, match='target'):
        prune(build('flatten_deit'), _loader(), 1.0)
    with pytest.raises(ConfigError, match='target'):
        prune(build('flatten_deit'), _loader(), -0.2)
    with pytest.raises(ConfigError, match='smallest structure'):
        prune(build('flatten_deit'), _loader(), 0.01, criterion='magnitude')
    with pytest.raises(ConfigError, match='unknown prune option'):
        prune(build('flatten_deit'), _loader(), 0.5, serch_steps=3)


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
def test_search_resumes_exactly_from_a_saved_state(schedule):
    from amap.prune.api import resolve_target
    from amap.prune.search import Search, SearchSettings

    def fresh():
        model = build('flatten_deit')
        pruner = prepare(model, (3, 32, 32), PruneConfig(), _calib())
        settings = SearchSettings(steps=8, log_every=2, indicator_schedule=schedule)
        return Search(pruner, resolve_target(0.5, pruner.full_macs), settings, teacher=build('flatten_deit'))

    loader = _loader()  # 4 batches per epoch: the 8 steps span two epochs
    straight = fresh()
    straight.run(loader)
    first = fresh()
    first.run(loader, until=5)
    saved = {k: v for k, v in first.state_dict().items()}
    resumed = fresh()
    resumed.load_state_dict(saved)
    assert resumed.step == 5
    resumed.run(loader)
    assert resumed.history == straight.history
    for (n, a), (_, b) in zip(straight.pruner.state_dict().items(), resumed.pruner.state_dict().items()):
        assert torch.equal(a, b), n
    for (n, a), (_, b) in zip(straight.pruner.model[0].state_dict().items(),
                              resumed.pruner.model[0].state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


def test_amap_prune_is_callable_and_a_package_after_any_import():
    import amap
    import amap.prune.api  # importing a submodule must not shadow the function (it used to)

    res1 = amap.prune(build('flatten_deit'), _loader(), 0.7, criterion='magnitude', calib_batches=1)
    res2 = amap.prune(build('flatten_deit'), _loader(), 0.7, criterion='magnitude', calib_batches=1)
    assert res1.structure == res2.structure
    assert amap.prune.Pruner is amap.prune.pruner.Pruner


def test_gradient_accumulation_equals_one_step_on_the_union():
    from amap.prune.api import resolve_target
    from amap.prune.search import Search, SearchSettings

    def loop(accum: int, batch: int) -> Search:
        pruner = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(similarity=False), _calib())
        settings = SearchSettings(steps=2, accum_steps=accum, clip_grad=None, log_every=1)
        return Search(pruner, resolve_target(0.5, pruner.full_macs), settings, teacher=build('flatten_deit'))

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    halves = [(x[i:i + 4], y[i:i + 4]) for x, y in data for i in (0, 4)]
    whole, accum = loop(1, 8), loop(2, 4)
    whole.run(data)
    accum.run(halves)
    assert accum.step == whole.step == 2
    for (n, a), (_, b) in zip(whole.pruner.model[0].state_dict().items(), accum.pruner.model[0].state_dict().items()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, msg=n)
    for (n, a), (_, b) in zip(whole.pruner.state_dict().items(), accum.pruner.state_dict().items()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, msg=n)
    assert [h['loss'] for h in whole.history] == pytest.approx([h['loss'] for h in accum.history], abs=1e-5)


def test_non_finite_loss_stops_the_search_with_the_step_and_a_hint():
    from amap.errors import AmapError
    from amap.prune.api import resolve_target
    from amap.prune.search import Search, SearchSettings

    pruner = prepare(build('flatten_deit'), (3, 32, 32), PruneConfig(similarity=False), _calib())
    loop = Search(pruner, resolve_target(0.5, pruner.full_macs), SearchSettings(steps=3))
    before = {k: v.clone() for k, v in pruner.model[0].state_dict().items()}
    x, y = _loader()[0]
    loop.train_step(x, y)
    with pytest.raises(AmapError, match='non-finite loss .* search step 1.*learning rate'):
        loop.train_step(torch.full_like(x, float('nan')), y)
    assert loop.step == 1  # the failed step was not counted
    assert any(not torch.equal(before[k], v) for k, v in pruner.model[0].state_dict().items())
    assert all(torch.isfinite(v).all() for v in pruner.model[0].state_dict().values())  # no NaN reached the weights


def test_staged_pruning_is_what_amap_prune_runs():
    cfg = PruneConfig(target=0.6, calib_batches=2, search_steps=4, log_every=2)
    result = prune(build('flatten_deit'), _loader(), 0.6, config=cfg, teacher=None)
    model = build('flatten_deit')
    job = StagedPruning(model, (3, 32, 32), cfg)
    with pytest.raises(RuntimeError, match="'search' needs one of \\['calibrated'\\]"):
        job.search(_loader())
    torch.manual_seed(cfg.seed)
    job.prepare()
    job.calibrate(_loader()[:2])
    job.search(_loader())
    job.finalize()
    assert job.cut() == result.structure
    assert job.history == result.history
    for (na, pa), (nb, pb) in zip(result.model.state_dict().items(), model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    assert set(job.seconds) == {'calibration', 'search', 'surgery'}
