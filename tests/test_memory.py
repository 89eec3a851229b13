"CellMemory: clear errors, save/load, Flat -> IVF switch with ids kept, determinism, label transfer, AnnData helpers."
import json
import anndata as ad
import numpy as np, pandas as pd, pytest
from deepseq_nb.data import InputError
from deepseq_nb.memory import CellMemory, knn_annotate, memory_from_settings
from deepseq_nb.vector_index import ivf_nlist, set_threads, synthetic_embeddings

set_threads(2)

@pytest.fixture(scope='module')
def data():
    X, y = synthetic_embeddings(3000, 32, n_types=12, seed=3)  # a 15-NN vote recovers 98 % of labels
    return X, np.array([f't{i}' for i in y])

def small(**kw):
    m = CellMemory({'frozen': 4}, **kw)
    m.add(np.eye(4, dtype=np.float32), {'label': list('abcd')}, space='frozen')
    return m

# ---- errors ---------------------------------------------------------------------------------------------------------

def test_dimension_mismatch_names_space_and_dims():
    m = small()
    with pytest.raises(InputError, match=r"space 'frozen'.*4-dimensional vectors, but the query vectors have 5"):
        m.search(np.ones((2, 5)), 1, space='frozen')
    with pytest.raises(InputError, match=r"4-dimensional vectors, but the vectors have 3"):
        m.add(np.ones((1, 3)), {'label': ['x']}, space='frozen')
    assert len(m) == 4 and m.size('frozen') == 4  # a failed add changes nothing

def test_nan_zero_and_shape_errors():
    m = small()
    q = np.ones((3, 4)); q[2, 1] = np.nan
    with pytest.raises(InputError, match=r"1 of 3 query vectors for space 'frozen' hold NaN or inf \(first: row 2\)"):
        m.search(q, 1, space='frozen')
    with pytest.raises(InputError, match='inf'): m.add(np.full((1, 4), np.inf), {'label': ['x']}, space='frozen')
    with pytest.raises(InputError, match='all zeros'): m.add(np.zeros((1, 4)), {'label': ['x']}, space='frozen')
    with pytest.raises(InputError, match='2-D'): m.search(np.ones((2, 2, 4)), 1, space='frozen')
    assert len(m) == 4

def test_unknown_space_empty_memory_and_k():
    m = small()
    with pytest.raises(InputError, match=r"Unknown space 'tuned'; the memory has frozen"):
        m.search(np.ones(4), 1, space='tuned')
    with pytest.raises(InputError, match=r"k=5 but space 'frozen' holds 4 entries"):
        m.search(np.ones(4), 5, space='frozen')
    with pytest.raises(InputError, match='k=0'): m.transfer_labels(np.ones(4), 0, space='frozen')
    e = CellMemory({'frozen': 4})
    for call in (lambda: e.search(np.ones(4), 1), lambda: e.centroids(), lambda: e.distance_to_centroids(np.ones(4))):
        with pytest.raises(InputError, match="The memory is empty: space 'frozen' holds no entries"): call()
    with pytest.raises(InputError, match='no spaces yet: pass space='):
        CellMemory().add(np.ones((1, 4)), {'label': ['a']})
    two = CellMemory({'a': 2, 'b': 2})
    with pytest.raises(InputError, match='spaces a, b: pass space='): two.search(np.ones(2), 1)

def test_metadata_and_id_errors():
    m = small()
    with pytest.raises(InputError, match="needs a 'label' column"):
        m.add(np.ones((1, 4)), {'cell_type': ['x']}, space='frozen')
    with pytest.raises(InputError, match='New entries need metadata'): m.add(np.ones((1, 4)), space='frozen')
    with pytest.raises(InputError, match='obs has 2 rows for 1 vectors'):
        m.add(np.ones((1, 4)), {'label': ['x', 'y']}, space='frozen')
    with pytest.raises(InputError, match='unique non-negative'):
        m.add(np.ones((2, 4)), {'label': ['x', 'y']}, space='frozen', ids=[7, 7])
    with pytest.raises(InputError, match='already have vectors'): m.add(np.ones((1, 4)), space='frozen', ids=[0])
    with pytest.raises(InputError, match=r"2 ids are not in the memory \(first: \[10, 11\]\)"): m.remove([0, 10, 11])
    with pytest.raises(InputError, match='exactly one of'): m.remove()
    with pytest.raises(InputError, match='Unknown metadata columns'): m.remove(cell_type='a')
    with pytest.raises(InputError, match='Space names'): m.add(np.ones((1, 2)), {'label': ['x']}, space='../x')
    with pytest.raises(InputError, match='Unknown metric'): CellMemory(metric='ip')
    with pytest.warns(UserWarning, match='no entry matches'): assert m.remove(label='zz') == 0
    assert len(m) == 4

# ---- behaviour ------------------------------------------------------------------------------------------------------

def test_exact_neighbours_and_remove():
    m = small()
    nb = m.search(np.array([[1, .1, 0, 0], [0, 0, .2, 1]]), 2, space='frozen')
    assert nb.ids.tolist() == [[0, 1], [3, 2]] and nb.labels.tolist() == [['a', 'b'], ['d', 'c']]
    assert np.isclose(nb.distances[0, 0], 1 - 1/np.sqrt(1.01), atol=1e-6)
    assert m.remove(label=['a', 'c']) == 2 and m.obs.index.tolist() == [1, 3] and m.entry_ids().tolist() == [1, 3]
    assert m.search(np.array([1, .1, 0, 0]), 2).ids.tolist() == [[1, 3]]
    assert m.remove(where=lambda o: o.label == 'b') == 1 and m.size() == 1

def test_inputs_converted_safely():
    m = small()
    q = np.asfortranarray(np.array([[2., .2, 0, 0, 9], [0, 0, 0, 3., 9]]))[:, :4]  # float64, non-contiguous
    before = q.copy()
    assert m.search(q, 1).ids.ravel().tolist() == [0, 3] and np.array_equal(q, before)
    assert m.search(pd.DataFrame(q), 1).ids.ravel().tolist() == [0, 3]

def test_l2_metric_distances():
    m = CellMemory(metric='l2')
    m.add(np.array([[0, 0], [3, 4]], np.float32), {'label': ['o', 'p']}, space='s')
    nb = m.search(np.array([[0, 0]]), 2)
    assert nb.distances.tolist() == [[0, 5]] and nb.labels.tolist() == [['o', 'p']]
    assert np.allclose(m.distance_to_centroids(np.array([[0, 0]])).to_numpy(), [[0, 5]])

def test_two_spaces_and_filling_a_space_later(data):
    X, y = data
    m = CellMemory()
    m.add({'frozen': X[:100], 'tuned': X[:100, :8]}, {'label': y[:100], 'dataset': 'd1'})
    assert m.size('frozen') == m.size('tuned') == 100 and m.dim('tuned') == 8
    new = m.add(X[100:150], {'label': y[100:150]}, space='frozen')
    assert m.size('tuned') == 100 and new.tolist() == list(range(100, 150))
    m.add(X[100:150, :8], space='tuned', ids=new)
    assert m.size('tuned') == 150 and np.allclose(
        m.vectors('tuned', [120]), X[120:121, :8] / np.linalg.norm(X[120, :8]), atol=1e-6
    )
    assert m.remove(new[:10]) == 10 and m.size('frozen') == m.size('tuned') == 140

def test_label_transfer_weighting_and_accuracy(data):
    X, y = data
    m = CellMemory(); m.add(X[:2000], {'label': y[:2000]}, space='frozen')
    for w in ('inverse', 'exp', 'uniform'):
        t = m.transfer_labels(X[2000:], 15, weighting=w)
        assert (t.label.to_numpy() == y[2000:]).mean() >= 0.95, w
        assert t.confidence.between(0, 1).all() and (t.distance >= 0).all()
    # distance weighting: two far 'x' votes lose to one near 'y' vote; a plain majority does not
    s = CellMemory(); s.add(np.array([[1, 0], [0, 1], [0.1, 1]], np.float32), {'label': ['y', 'x', 'x']}, space='s')
    q = np.array([[1, 0.05]])
    assert s.transfer_labels(q, 3).label[0] == 'y' and s.transfer_labels(q, 3, weighting='uniform').label[0] == 'x'
    with pytest.raises(InputError, match='Unknown weighting'): s.transfer_labels(q, 3, weighting='gauss')

def test_centroids_follow_changes():
    X, y = synthetic_embeddings(600, 16, n_types=12, type_spread=3.0, seed=3)  # types far apart: nearest centroid works
    m = CellMemory(); m.add(X[:500], {'label': y[:500]}, space='frozen')
    C = m.centroids()
    assert sorted(C.index) == sorted(set(y[:500].astype(str))) and np.allclose(np.linalg.norm(C, axis=1), 1, atol=1e-5)
    D = m.distance_to_centroids(X[500:600])
    assert D.shape == (100, len(C)) and (D.idxmin(1).to_numpy() == y[500:600].astype(str)).mean() >= 0.95
    lab = str(y[0]); m.remove(label=lab)
    assert lab not in m.centroids().index  # the cache is dropped on change

def test_flat_to_ivf_switch_keeps_ids(data):
    X, y = data
    m = CellMemory(ivf_threshold=2000, nprobe=8)
    m.add(X[:1500], {'label': y[:1500]}, space='frozen', ids=np.arange(1500)*3 + 7)
    assert m.index_type() == 'flat'
    m.add(X[1500:2500], {'label': y[1500:2500]}, space='frozen')
    assert m.index_type() == 'ivf' and m._index['frozen'].nlist == ivf_nlist(2500)
    ids = m.entry_ids()
    assert ids.tolist() == sorted(m.obs.index.tolist()) and ids[:1500].tolist() == (np.arange(1500)*3 + 7).tolist()
    assert ids[1500:].tolist() == list(range(4505, 5505))  # next ids follow the largest given id
    Xn = X[:2500] / np.linalg.norm(X[:2500], axis=1, keepdims=True)
    assert np.allclose(m.vectors(), Xn, atol=1e-6)  # vectors survive the rebuild, in id order
    self_hit = m.search(X[:2500], 1).ids.ravel()
    assert (self_hit == ids).mean() >= 0.999  # every stored point finds itself through IVF
    assert m.remove(ids[:1200]) == 1200 and m.index_type() == 'ivf'  # 1,300 >= threshold/2: stays IVF
    m.remove(ids[1200:1600])  # 900 < threshold/2: back to Flat
    assert m.index_type() == 'flat' and m.entry_ids().tolist() == ids[1600:].tolist()
    assert np.allclose(m.vectors(), Xn[1600:], atol=1e-6)

def test_ivf_short_results_are_marked(data):
    X, y = data
    m = CellMemory(index='ivf', nprobe=1); m.add(X[:2000], {'label': y[:2000]}, space='frozen')
    nb = m.search(X[2000:2005], 500)
    miss = nb.ids < 0
    assert miss.any() and np.isinf(nb.distances[miss]).all() and all(v is None for v in nb.labels[miss])
    t = m.transfer_labels(X[2000:2005], 500)
    assert t.label.notna().all() and t.confidence.between(0, 1).all()

def test_deterministic_ivf(data):
    X, y = data
    res = []
    for _ in range(2):
        m = CellMemory(index='ivf', nprobe=4, seed=5); m.add(X[:2500], {'label': y[:2500]}, space='frozen')
        nb = m.search(X[2500:], 10); res.append((nb.ids, nb.distances))
    assert np.array_equal(res[0][0], res[1][0]) and np.array_equal(res[0][1], res[1][1])

@pytest.mark.parametrize('index', ['flat', 'ivf'])
def test_save_load_round_trip(tmp_path, data, index):
    X, y = data
    m = CellMemory(index=index, nprobe=4)
    obs = pd.DataFrame(
        {
            'label': y[:2500],
            'tissue': 'blood',
            'n_genes': np.arange(2500),
            'score': np.linspace(0, 1, 2500),
            'qc': np.arange(2500) % 2 == 0,
            'batch': pd.Categorical(np.where(np.arange(2500) < 1000, 'b1', 'b2')),
        }
    )
    m.add({'frozen': X[:2500], 'tuned': X[:2500, :6]}, obs)
    m.remove(label=y[0])
    m.save(tmp_path/'mem')
    man = json.loads((tmp_path/'mem'/'manifest.json').read_text())
    assert (
        man['metric'] == 'cosine'
        and man['spaces']['frozen']['index_type'] == index
        and man['spaces']['tuned']['dim'] == 6
    )
    r = CellMemory.load(tmp_path/'mem')
    pd.testing.assert_frame_equal(r.obs, m.obs)
    for s in ('frozen', 'tuned'):
        q = X[2500:, :m.dim(s)]
        a, b = m.search(q, 10, space=s), r.search(q, 10, space=s)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.distances, b.distances) and r.index_type(s) == index
    assert r.add(X[:1, :6], {'label': ['new']}, space='tuned').tolist() == [2500]

def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no manifest.json'): CellMemory.load(tmp_path)
    small().save(tmp_path/'m')
    man = json.loads((tmp_path/'m'/'manifest.json').read_text()); man['format'] = 99
    (tmp_path/'m'/'manifest.json').write_text(json.dumps(man))
    with pytest.raises(InputError, match='memory format 99'): CellMemory.load(tmp_path/'m')

def test_adata_helpers(data):
    X, y = data
    ref = ad.AnnData(
        np.zeros((2000, 1), np.float32), obs=pd.DataFrame({'cell_type': y[:2000]}, index=[f'r{i}' for i in range(2000)])
    )
    ref.obsm['X_scgpt'] = X[:2000].astype(np.float64)
    qry = ad.AnnData(
        np.zeros((1000, 1), np.float32), obs=pd.DataFrame({'cell_type': y[2000:]}, index=[f'q{i}' for i in range(1000)])
    )
    qry.obsm['X_scgpt'] = X[2000:]
    m = CellMemory()
    m.add_adata(ref, tissue='lung', dataset='ref1')
    assert m.obs.obs_name.iloc[5] == 'r5' and (m.obs.tissue == 'lung').all() and m.spaces == ['frozen']
    out = knn_annotate(qry, m, copy=True)
    assert 'memory_label' not in qry.obs and out.obs['memory_label'].dtype == 'category'
    assert (out.obs['memory_label'].astype(str) == out.obs['cell_type']).mean() >= 0.95
    assert out.obs['memory_label_confidence'].between(0, 1).all()
    assert out.uns['memory_label']['params']['k'] == 15 and out.uns['memory_label']['params']['space'] == 'frozen'
    assert knn_annotate(qry, m, key_added='lab', k=5) is None and qry.uns['lab']['params']['k'] == 5
    with pytest.raises(InputError, match=r"adata.obsm has no 'X_pca'"): knn_annotate(qry, m, use_rep='X_pca')

def test_settings_defaults():
    m = memory_from_settings({'memory': {'ivf_threshold': 10, 'metric': 'l2'}}, nprobe=3)
    assert (m.ivf_threshold, m.metric, m.nprobe, m.index) == (10, 'l2', 3, 'auto')
