"The cross-tissue experiment (deepseq_nb.crosstissue) end to end on a few cells: every method, cache, saved plugins."
import numpy as np
import pandas as pd
import pytest
import torch

import deepseq_nb.crosstissue as ct
import deepseq_nb.crosstissue_run as ctr
from deepseq_nb.config import load_settings
from deepseq_nb.data import InputError
from deepseq_nb.encoder import make_vocab, new_encoder
from deepseq_nb.router import predict
from deepseq_nb.plugin_store import load_plugins

torch.set_num_threads(1)
SMALL = [
    'crosstissue.max_cells=60',
    'crosstissue.n_hvg=200',
    'crosstissue.plugin_epochs=3',
    'plugins.router_epochs=3',
    'crosstissue.seeds=[0, 1]',
    'crosstissue.plugin_max_cells=40',
]


@pytest.fixture(scope='module')
def enc():
    "A tiny untrained encoder over the reference's genes: these tests check the plumbing, not accuracy."
    genes = ct.cross_tissue_reference(max_cells=60).var_names
    return new_encoder(make_vocab(list(genes)), d_model=16, nlayers=1, nhead=2, d_hid=32, max_len=32, seed=0)


@pytest.fixture(scope='module')
def run(enc, tmp_path_factory):
    cache = tmp_path_factory.mktemp('ct')/'cross_tissue.h5ad'
    return ctr.run_cross_tissue(load_settings(overrides=SMALL), cache=cache, encoder=enc), cache


def test_every_method_scored_per_tissue(run):
    res, _ = run
    t, per_seed = res['table'], res['per_seed']
    assert set(t.method) == set(ctr.METHOD_NAMES.values())
    assert set(t.tissue) == {'blood', 'pancreas', 'all'}
    n = t[t.method == ctr.METHOD_NAMES['router']].set_index('tissue').n
    assert n['all'] == n['blood'] + n['pancreas'] == res['n_test'] == (res['ref'].obs.split == 'test').sum()
    assert t[['accuracy_mean', 'macro_f1_mean']].apply(lambda c: c.between(0, 1)).all().all()
    # two seeds: the table is their mean and sd, and the seeds' splits differ
    assert (t.n_seeds == 2).all() and sorted(per_seed.seed.unique()) == [0, 1]
    m = per_seed.groupby(['method', 'tissue']).macro_f1.agg(['mean', 'std'])
    tt = t.set_index(['method', 'tissue'])
    assert np.allclose(tt.macro_f1_mean, m.loc[tt.index, 'mean']) and np.allclose(
        tt.macro_f1_sd, m.loc[tt.index, 'std']
    )
    assert (per_seed.groupby('seed').macro_f1.sum().diff().dropna() != 0).all()
    # the heads were chosen per seed and tissue on validation cells, exactly one each
    v = res['validation']
    assert v.groupby(['seed', 'tissue']).chosen.sum().eq(1).all() and set(v['head']) >= {
        'lora',
        'expr C=0.1',
        'expr C=1',
    }
    # a prediction column per method, filled for test cells only
    ref = res['ref']
    test = (ref.obs.split == 'test').to_numpy()
    for name in ctr.METHOD_NAMES.values():
        col = ref.obs['pred_' + name.split(' ', 1)[1]]
        assert (col[test] != 'nan').all() and (col[~test] == 'nan').all()
    # the plugin-tuned space covers every cell; the router chose one of the two tissues for each
    assert ref.obsm['X_scgpt_tuned'].shape == (ref.n_obs, 16) and set(ref.obs.router_tissue) <= {'blood', 'pancreas'}
    # scores recomputed from the stored predictions give the table
    y = ref.obs.label[test].astype(str)
    acc = (ref.obs['pred_' + ctr.METHOD_NAMES['knn'].split(' ', 1)[1]][test] == y).mean()
    assert acc == pytest.approx(
        per_seed.query("seed == 0 and method == '(a) memory kNN, frozen' and tissue == 'all'").accuracy.item()
    )


def test_cache_reused_only_for_the_same_settings(run, enc, monkeypatch):
    res, cache = run
    def boom(*a, **k): raise AssertionError('recomputed')
    monkeypatch.setattr(ctr, 'embed_reference', boom)   # the first step after the (cheap) reference is built
    again = ctr.run_cross_tissue(load_settings(overrides=SMALL), cache=cache, encoder=enc)
    pd.testing.assert_frame_equal(again['table'], res['table'])
    pd.testing.assert_frame_equal(again['per_seed'], res['per_seed'])
    real_ref = ct.cross_tissue_reference

    def relabelled(*a, **k):  # a change of the label harmonisation (e.g. the ontology mapping) is another experiment
        r = real_ref(*a, **k)
        r.obs['label'] = r.obs['label'].astype(str)
        r.obs.iloc[0, r.obs.columns.get_loc('label')] = 'other'
        return r
    monkeypatch.setattr(ctr, 'cross_tissue_reference', relabelled)
    with pytest.raises(AssertionError, match='recomputed'):
        ctr.run_cross_tissue(load_settings(overrides=SMALL), cache=cache, encoder=enc)
    monkeypatch.setattr(ctr, 'cross_tissue_reference', real_ref)
    with pytest.raises(AssertionError, match='recomputed'):   # another k is another experiment
        ctr.run_cross_tissue(load_settings(overrides=SMALL + ['crosstissue.k=5']), cache=cache, encoder=enc)
    with pytest.raises(AssertionError, match='recomputed'):   # so are other plugin settings
        ctr.run_cross_tissue(load_settings(overrides=SMALL + ['plugins.lora_r=4']), cache=cache, encoder=enc)


def test_saved_plugins_reproduce_the_router(run, enc):
    res, cache = run
    ps = load_plugins(cache.with_name('cross_tissue_plugins'), enc)
    assert ps.tissues == ['blood', 'pancreas'] and ps.router is not None
    ref = res['ref']
    te = ref[ref.obs.split == 'test'][:40].copy()
    predict(te, ps, key_added='again')
    col = 'pred_' + ctr.METHOD_NAMES['router'].split(' ', 1)[1]
    assert (te.obs.again_label.astype(str) == te.obs[col]).all()
    np.testing.assert_allclose(te.obsm['X_scgpt_tuned'], ref[te.obs_names].obsm['X_scgpt_tuned'], atol=1e-5)


def test_unknown_method_is_refused_before_any_work(enc, monkeypatch):
    def boom(*a, **k): raise AssertionError('started')
    monkeypatch.setattr(ctr, 'cross_tissue_reference', boom)
    with pytest.raises(InputError, match="Unknown cross-tissue methods \\['knn_frozen'\\].*known: knn, knn_tuned"):
        ctr.run_cross_tissue(load_settings(overrides=['crosstissue.methods=knn_frozen,router']), encoder=enc)


def test_baselines_only_train_no_plugins(enc, tmp_path):
    res = ctr.run_cross_tissue(
        load_settings(
            overrides=['crosstissue.max_cells=40', 'crosstissue.n_hvg=100', 'crosstissue.methods=knn,logreg']
        ),
        cache=tmp_path / 'c.h5ad',
        encoder=enc,
    )
    assert set(res['table'].method) == {ctr.METHOD_NAMES['knn'], ctr.METHOD_NAMES['logreg']}
    assert 'X_scgpt_tuned' not in res['ref'].obsm and not (tmp_path/'c_plugins').exists()


def test_heads_are_chosen_without_the_test_labels(enc):
    "plugin_heads sees validation cells carved from the training split only: shuffling the test labels changes nothing."
    from deepseq_nb.plugins import plugin_settings
    ref = ct.cross_tissue_reference(max_cells=60)
    ct.embed_reference(ref, enc)
    val = ct.validation_mask(ref, 0.15, seed=0)
    assert val.any() and not (val & (ref.obs.split == 'test').to_numpy()).any()
    _, ps = ct.plugin_methods(
        ctr._plugin_view(ref, val, 40, 0), enc, params=plugin_settings() | dict(epochs=2, router_epochs=2)
    )
    h1 = ct.plugin_heads(ref, ps, val, n_hvg=100)
    shuffled = ref.copy()
    test = (ref.obs.split == 'test').to_numpy()
    lab = ref.obs.label.astype(str).to_numpy().copy()
    lab[test] = np.random.default_rng(1).permutation(lab[test])
    shuffled.obs['label'] = pd.Categorical(lab)
    h2 = ct.plugin_heads(shuffled, ps, val, n_hvg=100)
    pd.testing.assert_frame_equal(h1['validation'], h2['validation'])
    for t in h1['chosen']: np.testing.assert_array_equal(h1['chosen'][t]['proba'], h2['chosen'][t]['proba'])
