"Adding a type to a plugin (deepseq_nb.incremental): slots, frozen logits, errors, rollback, determinism, protocols."
import numpy as np
import pandas as pd
import pytest
import torch

import deepseq_nb.plugins as plugins_mod
from deepseq_nb.utils import subsample_types
from deepseq_nb.data import InputError, load_dataset
from deepseq_nb.encoder import make_vocab, new_encoder, tokenize
from deepseq_nb.incremental import (add_cell_type, forgetting_curve, incremental_settings, new_type_curve, plugin_state,
                                    rehearsal_sample, restore_plugin, same_state, type_scores)
from deepseq_nb.memory import CellMemory
from deepseq_nb.plugins import lora_parameters, plugin_outputs, train_plugin
from deepseq_nb.plugin_store import load_plugins, save_plugins

torch.set_num_threads(1)
FAST = dict(epochs=2, seed=0)      # plugin training: these tests check behaviour, not accuracy
ADD = dict(epochs=3, batch_size=16)  # an addition: several optimiser steps


@pytest.fixture(scope='module')
def cells():
    "160 pancreas_xin cells (alpha, beta, gamma, delta), drawn per type."
    x = load_dataset('pancreas_xin')
    x = x[subsample_types(x.obs['cell_type'], 160, seed=0)].copy()
    x.obs['cell_type'] = x.obs['cell_type'].astype(str)
    return x


@pytest.fixture(scope='module')
def enc(cells):
    return new_encoder(make_vocab(list(cells.var_names)), d_model=16, nlayers=1, nhead=2, d_hid=32, max_len=32, seed=0)


@pytest.fixture(scope='module')
def base(cells, enc):
    "A plugin trained without delta cells, its state, and the delta cells."
    ref = cells[cells.obs.cell_type != 'delta'].copy()
    ps = train_plugin(ref, enc, tissue='pancreas', extra_slots=2, **FAST)
    return ps, plugin_state(ps, 'pancreas'), ref, cells[cells.obs.cell_type == 'delta'].copy()


@pytest.fixture
def fresh(base):
    "The base plugin, restored to its state before each test."
    ps, state, ref, delta = base
    restore_plugin(ps, 'pancreas', state)
    yield ps, state, ref, delta
    restore_plugin(ps, 'pancreas', state)


def logits(ps, cells):
    return plugin_outputs(ps, tokenize(cells, ps.encoder), 'pancreas').logits


# --- slot bookkeeping ------------------------------------------------------------------------------------------------

def test_new_type_takes_the_first_free_slot_and_is_recorded(fresh, cells):
    ps, state, ref, delta = fresh
    head = ps.heads['pancreas']
    assert head.known == ['alpha', 'beta', 'gamma'] and head.free_slots == [3, 4]
    add_cell_type(delta[:8], ps, tissue='pancreas', reference=ref, rehearsal=4, **ADD)
    assert (
        head.labels == ['alpha', 'beta', 'gamma', 'delta', None] and head.free_slots == [4] and head.slot('delta') == 3
    )
    assert head.active.tolist() == [True, True, True, True, False]
    a = ps.info['pancreas']['additions']
    assert len(a) == 1 and a[0]['label'] == 'delta' and a[0]['slot'] == 3 and a[0]['n_cells'] == 8
    assert a[0]['rehearsal'] == {'alpha': 4, 'beta': 4, 'gamma': 4} and a[0]['train_lora'] and not a[0]['freeze_old']
    assert len(a[0]['log']) == ADD['epochs'] and ps.info['pancreas']['labels'] == head.known
    lg = logits(ps, cells)
    assert np.isfinite(lg[:, :4]).all() and np.isinf(lg[:, 4]).all()
    # a second type goes into the last slot; the history grows
    ty = cells.copy(); ty.obs['cell_type'] = 'epsilon'
    with pytest.warns(UserWarning, match=r"no cells of \['delta'\]"):   # the reference holds no delta cell to replay
        add_cell_type(ty[:5], ps, tissue='pancreas', reference=ref, rehearsal=2, **ADD)
    assert head.free_slots == [] and [x['label'] for x in ps.info['pancreas']['additions']] == ['delta', 'epsilon']
    assert ps.info['pancreas']['additions'][1]['rehearsal'] == {'alpha': 2, 'beta': 2, 'gamma': 2, 'delta': 0}


def test_label_picks_cells_of_a_mixed_anndata(fresh, cells):
    ps, _, ref, delta = fresh
    add_cell_type(cells, ps, tissue='pancreas', label='delta', reference=ref, rehearsal=2, **ADD)
    assert ps.info['pancreas']['additions'][-1]['n_cells'] == delta.n_obs
    bare = delta[:6].copy(); del bare.obs['cell_type']
    restore_plugin(ps, 'pancreas', fresh[1])
    add_cell_type(bare, ps, tissue='pancreas', label='delta', reference=ref, rehearsal=2, **ADD)
    assert ps.info['pancreas']['additions'][-1]['n_cells'] == 6


def test_addition_survives_save_and_load(fresh, cells, tmp_path):
    ps, _, ref, delta = fresh
    add_cell_type(delta, ps, tissue='pancreas', reference=ref, rehearsal=3, **ADD)
    back = load_plugins(save_plugins(ps, tmp_path/'p'), ps.encoder)
    assert back.heads['pancreas'].labels == ps.heads['pancreas'].labels
    assert np.array_equal(logits(back, cells), logits(ps, cells))
    assert back.info['pancreas']['additions'][0]['rehearsal'] == {'alpha': 3, 'beta': 3, 'gamma': 3}


# --- the frozen mode -------------------------------------------------------------------------------------------------

def test_frozen_lora_and_old_slots_keep_old_logits_to_the_bit(fresh, cells):
    ps, _, ref, delta = fresh
    before, lora0 = logits(ps, cells), {k: v.clone() for k, v in lora_parameters(ps, 'pancreas').items()}
    add_cell_type(delta, ps, tissue='pancreas', reference=ref, rehearsal=5, train_lora=False, freeze_old=True, **ADD)
    after = logits(ps, cells)
    assert np.array_equal(before[:, :3], after[:, :3])
    assert all(torch.equal(lora0[k], v) for k, v in lora_parameters(ps, 'pancreas').items())
    assert np.isinf(before[:, 3]).all() and np.isfinite(after[:, 3]).all()


def test_training_lora_does_change_old_logits(fresh, cells):
    "The check above can fail: with LoRA or the old slots training, old logits move."
    ps, state, ref, delta = fresh
    before = logits(ps, cells)
    add_cell_type(delta, ps, tissue='pancreas', reference=ref, rehearsal=5, train_lora=True, freeze_old=True, **ADD)
    assert not np.array_equal(before[:, :3], logits(ps, cells)[:, :3])
    restore_plugin(ps, 'pancreas', state)
    add_cell_type(delta, ps, tissue='pancreas', reference=ref, rehearsal=5, train_lora=False, freeze_old=False, **ADD)
    assert not np.array_equal(before[:, :3], logits(ps, cells)[:, :3])


# --- errors -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, match', [
    (dict(tissue='liver'), "No plugin for tissue 'liver'"),
    (dict(label='beta'), "'beta' is already a type"),
    (dict(label='delta', n=1), "1 labelled cell of 'delta': at least 2"),
    (dict(label='delta', n=0), "0 labelled cell of 'delta'"),
    (dict(reference=None), r"rehearsal=10 needs reference="),
    (dict(mixed=True), "holds 4 labels"),
])
def test_errors_leave_the_plugin_untouched(fresh, cells, kwargs, match):
    ps, state, ref, delta = fresh
    kw = dict(tissue='pancreas', reference=ref, rehearsal=10) | {
        k: v for k, v in kwargs.items() if k not in ('n', 'mixed')
    }
    new = cells if kwargs.get('mixed') else delta[:kwargs['n']] if 'n' in kwargs else delta
    if kw.get('label') == 'beta': new = cells
    with pytest.raises(InputError, match=match):
        add_cell_type(new, ps, **kw, **ADD)
    assert same_state(plugin_state(ps, 'pancreas'), state)


def test_no_free_slot(cells, enc):
    ref = cells[cells.obs.cell_type != 'delta']
    ps = train_plugin(ref, enc, tissue='pancreas', extra_slots=0, epochs=1)
    with pytest.raises(InputError, match="no free slot left .* more extra_slots"):
        add_cell_type(cells, ps, tissue='pancreas', label='delta', reference=ref)


def test_reference_without_label_column_and_missing_types(fresh):
    ps, state, ref, delta = fresh
    bad = ref.copy(); del bad.obs['cell_type']
    with pytest.raises(InputError, match="no obs column 'cell_type'"):
        add_cell_type(delta, ps, tissue='pancreas', reference=bad, **ADD)
    assert same_state(plugin_state(ps, 'pancreas'), state)
    with pytest.warns(UserWarning, match=r"no cells of \['gamma'\]"):
        add_cell_type(delta, ps, tissue='pancreas', reference=ref[ref.obs.cell_type != 'gamma'], rehearsal=3, **ADD)


# --- rollback ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
def test_failure_mid_training_rolls_back(fresh, cells, monkeypatch, exc):
    ps, state, ref, delta = fresh
    before = logits(ps, cells)
    real, calls, seen = plugins_mod.tuned_embeddings, [], {}
    def failing(plugins, batch, tissue, **kw):
        calls.append(1)
        if len(calls) == 5:   # the 5th forward pass in training: four optimiser steps have changed the plugin
            seen['changed'] = not same_state(plugin_state(plugins, tissue), state)
            seen['labels'] = list(plugins.heads[tissue].labels)
            raise exc('injected')
        return real(plugins, batch, tissue, **kw)
    monkeypatch.setattr(plugins_mod, 'tuned_embeddings', failing)
    with pytest.raises(exc, match='injected'):
        add_cell_type(delta, ps, tissue='pancreas', reference=ref, rehearsal=10, epochs=5, batch_size=8)
    monkeypatch.undo()
    assert seen == dict(changed=True, labels=['alpha', 'beta', 'gamma', 'delta', None])   # the failure was mid-training
    assert same_state(plugin_state(ps, 'pancreas'), state) and 'additions' not in ps.info['pancreas']
    assert np.array_equal(logits(ps, cells), before) and not any(
        p.requires_grad for p in lora_parameters(ps, 'pancreas').values()
    )
    add_cell_type(delta, ps, tissue='pancreas', reference=ref, rehearsal=3, **ADD)   # and it still works afterwards
    assert ps.heads['pancreas'].known[-1] == 'delta'


# --- determinism ------------------------------------------------------------------------------------------------------

def test_same_seed_same_plugin_other_seed_not(fresh, cells):
    ps, state, ref, delta = fresh
    out = []
    for seed in (0, 0, 1):
        restore_plugin(ps, 'pancreas', state)
        add_cell_type(delta, ps, tissue='pancreas', reference=ref, rehearsal=5, seed=seed, **ADD)
        out.append((logits(ps, cells), ps.info['pancreas']['additions'][-1]['log']))
    assert np.array_equal(out[0][0], out[1][0]) and out[0][1] == out[1][1]
    assert not np.array_equal(out[0][0], out[2][0])


# --- rehearsal --------------------------------------------------------------------------------------------------------

def test_rehearsal_sample(cells):
    y = cells.obs.cell_type.to_numpy()
    idx = rehearsal_sample(cells, ['alpha', 'delta'], 10, seed=0)
    assert pd.Series(y[idx]).value_counts().to_dict() == {'alpha': 10, 'delta': 10} and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, rehearsal_sample(cells, ['alpha', 'delta'], 10, seed=0))
    assert not np.array_equal(idx, rehearsal_sample(cells, ['alpha', 'delta'], 10, seed=1))
    n_delta = int((y == 'delta').sum())
    assert (y[rehearsal_sample(cells, ['delta'], 1000)] == 'delta').sum() == n_delta   # capped by what there is


def test_rehearsal_from_memory_takes_cells_nearest_the_centroid(cells):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(cells.n_obs, 8)).astype(np.float32)
    a = cells.copy(); a.obsm['X_e'] = X
    mem = CellMemory(n_threads=1)
    mem.add_adata(a[a.obs.cell_type != 'beta'], use_rep='X_e', space='e', label_key='cell_type')
    idx = rehearsal_sample(a, ['alpha', 'beta'], 3, memory=mem)
    al = np.flatnonzero(a.obs.cell_type == 'alpha')
    Xa = X[al] / np.linalg.norm(X[al], axis=1, keepdims=True)
    c = Xa.mean(0); c /= np.linalg.norm(c)
    assert set(idx) == set(al[np.argsort(1 - Xa @ c)[:3]])   # beta: not in the memory, so none
    mem2 = CellMemory(n_threads=1)
    mem2.add(X, obs=pd.DataFrame({'label': a.obs.cell_type.to_numpy()}), space='e')
    with pytest.raises(InputError, match='obs_name'):
        rehearsal_sample(a, ['alpha'], 3, memory=mem2)


def test_type_scores():
    s = type_scores(['a', 'a', 'b', 'n', 'n'], ['a', 'n', 'b', 'n', 'a'], ['a', 'b'], ['n'])
    assert s['old_accuracy'] == pytest.approx(2 / 3) and s['f1[n]'] == pytest.approx(0.5)
    assert s['old_macro_f1'] == pytest.approx((2 / 3 + 1) / 2)


def test_settings_overlay():
    s = incremental_settings({'incremental': {'rehearsal': 3, 'ks': [5], 'bogus': 1}})
    assert s['rehearsal'] == 3 and s['ks'] == [5] and 'bogus' not in s and s['steps'] == 5
    s = incremental_settings({'incremental': {'held_out': ['NK', 'B'], 'variants': None, 'ks': (5, 30), 'tissue': ''}})
    assert s['held_out'] == ['NK', 'B'] and s['ks'] == [5, 30]
    # None, '': the default
    assert (s['variants'] == ['lora_rehearsal', 'lora', 'frozen_rehearsal', 'frozen'] and s['tissue'] == 'blood')
    with pytest.raises(
        ValueError, match=r"incremental.held_out must be a list"
    ):  # one list syntax, as in settings files
        incremental_settings({'incremental': {'held_out': 'NK, B'}})
    with pytest.raises(ValueError, match=r"incremental.rehearsal must be an integer"):
        incremental_settings({'incremental': {'rehearsal': 'ten'}})


# --- protocols --------------------------------------------------------------------------------------------------------

def test_new_type_curve_caps_k_and_scores(cells, enc):
    df = new_type_curve(
        cells,
        enc,
        tissue='pancreas',
        held_out=['delta'],
        ks=(3, 6, 1000, 2000),
        variants=('lora_rehearsal', 'frozen'),
        plugin_params=dict(epochs=1),
        add_params=dict(epochs=1, rehearsal=3),
    )
    n_delta = int(((cells.obs.cell_type == 'delta').to_numpy()).sum())
    n_train = n_delta - max(1, round(0.3 * n_delta))
    assert list(df.k) == [3, 3, 6, 6, 1000, 1000, 2000, 2000] and list(df.k_used) == [3, 3, 6, 6] + [n_train] * 4
    assert list(df.capped) == [False] * 4 + [True] * 4 and list(df.variant[:2]) == ['lora_rehearsal', 'frozen']
    # one run serves both
    assert (df.iloc[4:6].drop(columns=['k']).equals(df.iloc[6:8].drop(columns=['k']).set_axis(df.index[4:6])))
    assert (df.n_test_new == n_delta - n_train).all() and df[['new_f1', 'old_macro_f1_after']].apply(
        lambda c: c.between(0, 1)
    ).all().all()
    fz = df[df.variant == 'frozen']
    assert (fz.old_accuracy_after <= fz.old_accuracy_before + 1e-12).all()
    with pytest.raises(InputError, match='Unknown variant'):
        new_type_curve(
            cells,
            enc,
            tissue='pancreas',
            held_out=['delta'],
            ks=(3,),
            variants=('bogus',),
            plugin_params=dict(epochs=1),
        )


def test_forgetting_curve_rows(cells, enc):
    df = forgetting_curve(
        cells,
        enc,
        tissue='pancreas',
        held_out=['gamma', 'delta'],
        k=4,
        variants=('frozen_rehearsal',),
        plugin_params=dict(epochs=1),
        add_params=dict(epochs=1, rehearsal=3),
    )
    assert list(df.variant) == ['frozen_rehearsal'] * 3 + ['scratch'] * 3 and list(df.step) == [0, 1, 2] * 2
    assert (
        list(df.added) == ['', 'gamma', 'delta'] * 2
        and list(df.n_types) == [2, 3, 4] * 2
        and (df.k[df.step > 0] == 4).all()
    )
    f = df[df.variant == 'frozen_rehearsal']
    assert (
        np.diff(f.base_accuracy) <= 1e-12
    ).all()  # frozen old slots and LoRA: base cells can only be lost to new slots
    with pytest.raises(InputError, match='leaves 1 for the first plugin'):
        forgetting_curve(
            cells, enc, tissue='pancreas', held_out=['beta', 'gamma', 'delta'], plugin_params=dict(epochs=1)
        )


def test_forgetting_curve_scratch_last_only(cells, enc):
    "scratch='last' retrains once, at the last step, on the same cells as every step: its row is the full run's last."
    kw = dict(
        tissue='pancreas',
        held_out=['gamma', 'delta'],
        k=4,
        variants=('frozen_rehearsal',),
        plugin_params=dict(epochs=1),
        add_params=dict(epochs=1, rehearsal=3),
    )
    last = forgetting_curve(cells, enc, scratch='last', **kw)
    every = forgetting_curve(cells, enc, scratch=True, **kw)
    s = last[last.variant == 'scratch']
    assert list(s.step) == [0, 2] and list(s.n_types) == [2, 4]
    cols = ['base_accuracy', 'seen_accuracy', 'seen_macro_f1']
    assert np.allclose(
        s[cols].to_numpy()[-1], every[(every.variant == 'scratch') & (every.step == 2)][cols].to_numpy()[0]
    )
    assert 'scratch' not in set(forgetting_curve(cells, enc, scratch='none', **kw).variant)
    with pytest.raises(InputError, match="scratch must be"):
        forgetting_curve(cells, enc, scratch='sometimes', **kw)


def test_settings_seeds_and_scratch():
    s = incremental_settings({'incremental': {'seeds': [0, 1, 2], 'scratch': 'last'}})
    assert s['seeds'] == [0, 1, 2] and s['scratch'] == 'last'
    assert incremental_settings({'incremental': {}})['seeds'] == [0]
