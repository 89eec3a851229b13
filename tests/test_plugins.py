"Failure injection, determinism and save/load of the LoRA tissue plugins and the router (deepseq_nb.plugins)."
import json

import numpy as np
import pytest
import torch

from deepseq_nb.data import InputError, load_dataset
from deepseq_nb.encoder import make_vocab, new_encoder, tokenize
from deepseq_nb.plugins import (
    PluginSet,
    SlotHead,
    add_plugin,
    base_weights_changed,
    encoder_fingerprint,
    fit_plugin,
    lora_parameters,
    lora_target_regex,
    plugin_outputs,
    plugin_settings,
    train_plugin,
)
from deepseq_nb.router import predict, train_router
from deepseq_nb.plugin_store import load_plugins, save_plugins
from deepseq_nb.utils import stratified_split

torch.set_num_threads(1)
FAST = dict(epochs=2, batch_size=32, seed=0)  # a couple of epochs: these tests check behaviour, not accuracy


@pytest.fixture(scope='module')
def cells():
    "Two small tissues: 120 pancreas cells (7 types) and 60 testis cells (mouse symbols, one type)."
    panc = load_dataset('pancreas_wang')
    panc = panc[np.sort(np.random.default_rng(0).choice(panc.n_obs, 120, replace=False))].copy()
    testis = load_dataset('testis_mca')[:60].copy()
    return dict(pancreas=panc, testis=testis)


def tiny_encoder(cells, seed=0):
    genes = list(cells['pancreas'].var_names) + [g.upper() for g in cells['testis'].var_names]
    return new_encoder(make_vocab(genes), d_model=16, nlayers=1, nhead=2, d_hid=32, max_len=32, seed=seed)


@pytest.fixture(scope='module')
def enc(cells): return tiny_encoder(cells)


@pytest.fixture(scope='module')
def trained(cells, enc):
    "Plugins for both tissues and a router."
    ps = train_plugin(cells['pancreas'], enc, tissue='pancreas', **FAST)
    train_plugin(cells['testis'], ps, tissue='testis', **FAST)
    train_router(cells, ps, epochs=5, seed=0)
    return ps


# --- input errors ---------------------------------------------------------------------------------------------------

def test_missing_label_column(cells, enc):
    with pytest.raises(InputError, match=r"no column 'celltype'.*cell_type"):
        train_plugin(cells['pancreas'], enc, tissue='pancreas', label_key='celltype', **FAST)


def test_more_types_than_slots_leaves_no_half_plugin(cells, enc):
    ps = PluginSet(enc)
    with pytest.raises(InputError, match="'pancreas' has 6 cell types but its head would have 3 slots"):
        train_plugin(cells['pancreas'], ps, tissue='pancreas', n_slots=3, **FAST)
    assert ps.tissues == [] and ps.peft is None


def test_unknown_tissue_and_candidates(cells, trained):
    with pytest.raises(InputError, match=r"No plugin for tissue 'liver'.*pancreas"):
        predict(cells['pancreas'], trained, tissue='liver', copy=True)
    with pytest.raises(InputError, match="No plugin for tissue 'liver'"):
        predict(cells['pancreas'], trained, candidates=['liver'], copy=True)


def test_same_tissue_twice_and_adapter_name_clash(cells, enc):
    ps = PluginSet(enc)
    add_plugin(ps, 'bone marrow', ['HSC'])
    with pytest.raises(InputError, match='already has a plugin'):
        train_plugin(cells['pancreas'], ps, tissue='bone marrow', **FAST)
    with pytest.raises(InputError, match='same adapter name'):
        add_plugin(ps, 'bone-marrow', ['HSC'])


def test_lora_targets_are_checked():
    with pytest.raises(InputError, match='out_proj gets no gradient'):
        lora_target_regex(['out_proj'])
    with pytest.raises(InputError, match='Unknown LoRA targets'):
        lora_target_regex(['q_proj'])
    assert 'value_encoder' not in lora_target_regex() and lora_target_regex('linear2').endswith('(linear2)')


def test_router_errors(cells, enc, trained):
    with pytest.raises(InputError, match=r"tissues \['blood'\] have no plugin"):
        train_router({'blood': cells['pancreas']}, trained)
    with pytest.raises(InputError, match=r"Plugins \['testis'\] have no reference cells"):
        train_router({'pancreas': cells['pancreas']}, trained)
    with pytest.raises(InputError, match=r"tissues \['Pancreas'\] have no plugin"):  # obs['tissue'] of the bundled data
        train_router(cells['pancreas'], trained)
    no_col = cells['pancreas'].copy(); del no_col.obs['tissue']
    with pytest.raises(InputError, match="no column 'tissue'"):
        train_router(no_col, trained)
    ps = train_plugin(cells['pancreas'], enc, tissue='pancreas', **FAST)
    train_plugin(cells['testis'], ps, tissue='testis', **FAST)
    with pytest.raises(InputError, match='no router'):
        predict(cells['pancreas'], ps, copy=True)
    train_router(cells, ps, epochs=2)
    add_plugin(ps, 'blood', ['B'])
    with pytest.raises(InputError, match='train_router\\(\\) again'):
        predict(cells['pancreas'], ps, copy=True)
    with pytest.raises(InputError, match='does not know'):
        trained.router.weights(torch.zeros(2, enc.d_model), candidates=['blood'])


def test_router_from_one_anndata(cells, trained):
    import anndata as ad
    both = ad.concat([cells['pancreas'], cells['testis']], join='outer')
    both.obs['organ'] = both.obs['tissue'].str.lower().to_numpy()
    ps = train_router(both, trained, tissue_key='organ', epochs=3, top_k=1)
    assert (
        ps is trained
        and trained.router.top_k == 1
        and trained.info['_router']['n_cells'] == {'pancreas': 120, 'testis': 60}
    )
    w = predict(cells['testis'], trained, copy=True).obsm['plugin_weights']
    assert ((w > 0).sum(1) == 1).all()
    train_router(cells, trained, epochs=5, seed=0)  # back to the fixture's router


def test_load_with_other_encoder(cells, trained, tmp_path):
    save_plugins(trained, tmp_path/'p')
    other = tiny_encoder(cells, seed=1)
    assert encoder_fingerprint(other) != trained.fingerprint
    with pytest.raises(InputError, match='trained on encoder .* fingerprint'):
        load_plugins(tmp_path/'p', other)
    with pytest.warns(UserWarning, match='fingerprint'):
        ps = load_plugins(tmp_path/'p', other, strict=False)
    assert ps.tissues == trained.tissues
    wide = new_encoder(other.vocab, d_model=24, nlayers=1, nhead=2, d_hid=32, max_len=32)
    with pytest.raises(InputError, match='16 dims'):  # another size cannot be forced
        load_plugins(tmp_path/'p', wide, strict=False)
    with pytest.raises(FileNotFoundError, match='plugins.json'):
        load_plugins(tmp_path, trained.encoder)


def test_load_adapter_that_does_not_fit_its_settings(trained, tmp_path):
    d = save_plugins(trained, tmp_path/'p')
    meta = json.loads((d/'plugins.json').read_text())
    meta['tissues']['pancreas']['lora']['r'] = 4  # the file holds rank-8 matrices
    (d/'plugins.json').write_text(json.dumps(meta))
    with pytest.raises(InputError, match="Adapter 'pancreas' .* does not fit"):
        load_plugins(d, trained.encoder)


def test_cells_without_labels_are_left_out(cells, enc):
    a = cells['pancreas'].copy()
    a.obs['cell_type'] = a.obs['cell_type'].astype(object)
    a.obs.iloc[:5, a.obs.columns.get_loc('cell_type')] = None
    with pytest.warns(UserWarning, match='5 cells without'):
        ps = train_plugin(a, enc, tissue='pancreas', **FAST)
    assert ps.info['pancreas']['n_cells'] == a.n_obs - 5


# --- guarantees -----------------------------------------------------------------------------------------------------

def test_base_weights_bit_identical_and_encoder_untouched(cells, enc, trained):
    ref = {k: v.clone() for k, v in tiny_encoder(cells).model.state_dict().items()}
    assert all(torch.equal(ref[k], v) for k, v in enc.model.state_dict().items())
    assert (
        base_weights_changed(trained) == [] and type(enc.model.transformer_encoder.layers[0].linear1) is torch.nn.Linear
    )


def test_lora_active_in_eval(cells, trained):
    tok = tokenize(cells['pancreas'][:20], trained.encoder)
    out = plugin_outputs(trained, tok, 'pancreas')
    assert not trained.model.training and torch.backends.mha.get_fastpath_enabled()  # the setting is restored
    with torch.no_grad(), trained.peft.disable_adapter():
        from deepseq_nb.encoder import cell_embeddings
        base = cell_embeddings(trained._enc, tok, pooling=trained.pooling).numpy()
    assert np.abs(out.embedding - base).max() > 1e-3


def test_self_attn_target_drifts_base_weights(cells, enc):
    "peft's LoRA for nn.MultiheadAttention merges and unmerges in place: documented, so pinned here."
    ps = train_plugin(cells['pancreas'], enc, tissue='pancreas', targets=('linear1', 'linear2', 'self_attn'), **FAST)
    changed = base_weights_changed(ps)
    assert changed and all('self_attn' in k for k in changed)


def test_seeds_give_identical_results(cells, enc):
    runs = [train_plugin(cells['pancreas'], enc, tissue='pancreas', **dict(FAST, seed=s)) for s in (3, 3, 4)]
    tok = tokenize(cells['pancreas'], enc)
    lg = [plugin_outputs(r, tok, 'pancreas').logits for r in runs]
    assert np.array_equal(lg[0], lg[1]) and runs[0].info['pancreas']['log'] == runs[1].info['pancreas']['log']
    assert not np.array_equal(lg[0], lg[2])
    state = torch.random.get_rng_state()
    train_plugin(cells['testis'], enc, tissue='testis', **FAST)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random state is untouched


def test_threads_restored(cells, trained):
    torch.set_num_threads(1)
    predict(cells['testis'], trained, tissue='testis', n_threads=2, copy=True)
    assert torch.get_num_threads() == 1


# --- heads and incremental-learning hooks ---------------------------------------------------------------------------

def test_slot_head_bookkeeping():
    h = SlotHead(8, 3, ['a', 'b']).eval()
    x = torch.randn(4, 8)
    before = h(x)
    assert torch.isinf(before[:, 2]).all() and h.free_slots == [2]
    assert h.add_label('c') == 2 and torch.equal(h(x)[:, :2], before[:, :2]) and h.known == ['a', 'b', 'c']
    with pytest.raises(InputError, match='No free slot'): h.add_label('d')
    with pytest.raises(InputError, match='already has slot'): h.add_label('a')
    with pytest.raises(InputError, match="'z' is not in the head"): h.slot('z')
    with pytest.raises(InputError, match='Duplicate'): SlotHead(8, 3, ['a', 'a'])


def test_new_type_in_free_slot_keeps_old_rows(cells, enc):
    ps = train_plugin(cells['pancreas'], enc, tissue='pancreas', **FAST)
    head = ps.heads['pancreas']
    old = [head.slot(l) for l in head.known]
    W, b = head.linear.weight.detach().clone(), head.linear.bias.detach().clone()
    lora = {k: v.detach().clone() for k, v in lora_parameters(ps, 'pancreas').items()}
    new = head.add_label('epsilon')
    t = cells['testis'][:20]  # stand-in cells of the "new type"
    tok = tokenize(t, enc)
    before = plugin_outputs(ps, tok, 'pancreas').logits[:, old]
    fit_plugin(ps, 'pancreas', tok, np.full(len(tok), new), epochs=30, train_lora=False, frozen_slots=old)
    assert torch.equal(head.linear.weight[old], W[old]) and torch.equal(head.linear.bias[old], b[old])
    assert not torch.equal(head.linear.weight[new], W[new])
    assert all(torch.equal(v, lora[k]) for k, v in lora_parameters(ps, 'pancreas').items())
    after = plugin_outputs(ps, tok, 'pancreas')
    assert np.array_equal(after.logits[:, old], before) and (after.label == 'epsilon').mean() > 0.5
    with pytest.raises(InputError, match='slots that hold a label'):
        fit_plugin(ps, 'pancreas', tok, np.full(len(tok), head.free_slots[0]), epochs=1)


# --- outputs, save and load -----------------------------------------------------------------------------------------

def test_predict_outputs_and_h5ad(cells, trained, tmp_path):
    a = cells['pancreas'].copy()
    out = predict(a, trained, key_added='pl', copy=True)
    assert 'pl_label' not in a.obs  # copy=True leaves the input alone
    for k in ('pl_label', 'pl_confidence', 'pl_tissue'): assert k in out.obs
    P, W = out.obsm['pl_proba'], out.obsm['pl_weights']
    assert (
        list(W.columns) == ['pancreas', 'testis'] and np.allclose(W.sum(1), 1) and np.allclose(P.sum(1), 1, atol=1e-5)
    )
    assert (out.obs['pl_confidence'].to_numpy() == P.max(1).to_numpy()).all()
    assert out.obsm['X_scgpt_tuned'].shape == (a.n_obs, 16) and out.uns['pl']['params']['router']
    out.write_h5ad(tmp_path/'a.h5ad')  # every output is writable
    told = predict(a, trained, tissue='pancreas', copy=True)
    assert (
        set(told.obs['plugin_label']) <= set(trained.heads['pancreas'].known)
        and (told.obsm['plugin_weights']['pancreas'] == 1).all()
    )


def test_save_load_round_trip(cells, trained, tmp_path):
    d = save_plugins(trained, tmp_path/'plugins')
    meta = json.loads((d/'plugins.json').read_text())
    assert meta['fingerprint'] == trained.fingerprint and set(meta['tissues']) == {'pancreas', 'testis'}
    back = load_plugins(d, trained.encoder)
    a1 = predict(cells['pancreas'], trained, copy=True)
    a2 = predict(cells['pancreas'], back, copy=True)
    assert a1.obs['plugin_label'].equals(a2.obs['plugin_label'])
    assert np.array_equal(a1.obsm['plugin_proba'].to_numpy(), a2.obsm['plugin_proba'].to_numpy())
    assert np.array_equal(a1.obsm['X_scgpt_tuned'], a2.obsm['X_scgpt_tuned'])
    assert (
        back.heads['pancreas'].labels == trained.heads['pancreas'].labels
        and back.router.tissues == trained.router.tissues
    )


def test_save_without_router_removes_stale_file(cells, enc, trained, tmp_path):
    save_plugins(trained, tmp_path)
    ps = train_plugin(cells['testis'], enc, tissue='testis', **FAST)
    save_plugins(ps, tmp_path)
    back = load_plugins(tmp_path, enc)
    assert back.router is None and back.tissues == ['testis'] and not (tmp_path/'router.safetensors').exists()
    out = predict(cells['testis'], back, copy=True)  # one plugin needs no router
    assert (out.obs['plugin_label'] == 'Spermatocyte').all()


def test_settings_and_split():
    s = plugin_settings({'plugins': {'lora_r': 4, 'bogus': 1}})
    assert s['lora_r'] == 4 and 'bogus' not in s
    y = np.array(['a'] * 10 + ['b'] * 3 + ['c'])
    m = stratified_split(y, 0.2, seed=1)
    assert m[:10].sum() == 2 and m[10:13].sum() == 1 and not m[13]  # a singleton type stays in training
    assert np.array_equal(m, stratified_split(y, 0.2, seed=1))
    with pytest.raises(InputError): stratified_split(y, 1.0)


def test_stop_on_macro_f1_keeps_the_best_f1_epoch(cells, enc):
    "stop_on='val_macro_f1' keeps the epoch of best validation macro-F1 (not lowest loss); a bad criterion is refused."
    ps = train_plugin(
        cells['pancreas'],
        enc,
        tissue='pancreas',
        **dict(FAST, epochs=6, patience=6, val_fraction=0.15, stop_on='val_macro_f1'),
    )
    info = ps.info['pancreas']
    log = info['log']
    assert (
        info['best']['val_macro_f1'] == max(r['val_macro_f1'] for r in log)
        and info['params']['stop_on'] == 'val_macro_f1'
    )
    with pytest.raises(InputError, match="stop_on must be"):
        train_plugin(cells['pancreas'], enc, tissue='pancreas', **dict(FAST, stop_on='accuracy'))


def test_default_training_runs_every_epoch_on_every_cell(cells, enc):
    "The default (`[plugins] val_fraction = 0`) holds nothing out: every epoch runs and the last one is kept."
    ps = train_plugin(cells['pancreas'], enc, tissue='pancreas', **dict(FAST, epochs=3))
    info = ps.info['pancreas']
    assert info['n_val'] == 0 and info['n_train'] == cells['pancreas'].n_obs
    assert [r['epoch'] for r in info['log']] == [1, 2, 3] and info['best']['epoch'] == 3
    assert 'val_loss' not in info['log'][-1]
