"Scaling: the Dask path equals the in-memory one; lazy reading, Dask client, sampled markers, sparse PCA, embedding."
import warnings
import numpy as np, pandas as pd, pytest, scipy.sparse as sp, h5py
import anndata as ad, scanpy as sc, dask, dask.array as da
import deepseq_nb.scale as S
import deepseq_nb.scale.io as scale_io
from deepseq_nb.scale import (
    synthetic_counts,
    read_lazy,
    dask_client,
    qc_flags,
    drop_failed,
    normalise,
    highly_variable,
    sparse_pca,
    rank_genes_sampled,
    marker_agreement,
    sample_indices,
    embed_batched,
    run_scaled,
    KNNGraph,
)
from deepseq_nb.data import load_dataset

warnings.filterwarnings('ignore')

def pc_corr(A, B): return np.array([abs(np.corrcoef(A[:, i], B[:, i])[0, 1]) for i in range(A.shape[1])])

@pytest.fixture(scope='module')
def h5(tmp_path_factory):
    "1,500 synthetic cells in memory and the same cells written to .h5ad in 500-cell chunks."
    p = synthetic_counts(1500, chunk_cells=500, seed=1, path=tmp_path_factory.mktemp('scale')/'syn.h5ad')
    return synthetic_counts(1500, chunk_cells=500, seed=1), p

@pytest.fixture(scope='module')
def both(h5):
    "The in-memory and the Dask (lazy file, threaded scheduler) paths, QC → PCA."
    mem, p = h5
    out = []
    for a in (mem.copy(), read_lazy(p, chunk_cells=400)):
        with dask.config.set(scheduler='threads'):
            qc_flags(a, min_genes=700)
            a = drop_failed(a)
            normalise(a)
            highly_variable(a, n_top_genes=800, chunk_cells=300)
            sparse_pca(a, n_comps=15, chunk_cells=300)
        out.append(a)
    return out

def test_synthetic_counts_resample_the_base(h5):
    mem, p = h5
    base = load_dataset('pbmc3k')
    assert mem.shape == (1500, base.n_vars) and mem.X.dtype == np.float32 and sp.isspmatrix_csr(mem.X)
    assert np.array_equal(mem.X.data, np.round(mem.X.data)) and mem.X.data.min() >= 1
    assert set(mem.obs.cell_type.cat.categories) == set(base.obs.cell_type.unique())
    # a mix of cells keeps about one cell's library size and detected genes
    lib, lib0 = np.asarray(mem.X.sum(1)).mean(), np.asarray(base.X.sum(1)).mean()
    assert 0.6 < lib / lib0 < 1.2, (lib, lib0)
    on_disk = ad.read_h5ad(p)
    assert (on_disk.X != mem.X).nnz == 0 and (on_disk.obs.cell_type == mem.obs.cell_type).all()

def test_read_lazy_reads_no_matrix_until_computed(h5, monkeypatch):
    _, p = h5
    calls = []
    real = scale_io._read_rows
    monkeypatch.setattr(scale_io, '_read_rows', lambda *a: calls.append(a[2:4]) or real(*a))
    a = read_lazy(p, chunk_cells=400, x_is='counts')
    assert calls == [] and isinstance(a.X, da.Array) and a.X.numblocks == (4, 1) and a.shape == (1500, 13714)
    b = a.X.blocks[2].compute()
    assert calls == [(800, 1200)] and sp.issparse(b) and b.shape == (400, 13714)

def test_read_lazy_10x_h5_matches_scanpy(tmp_path, h5):
    mem, _ = h5
    X = mem.X[:300].T.tocsc().astype(np.int32)  # 10x stores genes x cells, CSC
    with h5py.File(tmp_path/'f.h5', 'w') as f:
        g = f.create_group('matrix')
        for k, v in dict(data=X.data, indices=X.indices, indptr=X.indptr, shape=np.array(X.shape)).items(): g[k] = v
        g['barcodes'] = np.array([f'BC{i}' for i in range(300)], dtype='S')
        ft = g.create_group('features')
        ft['name'] = np.array(mem.var_names, dtype='S')
        ft['id'] = np.array([f'ENSG{i:011d}' for i in range(mem.n_vars)], dtype='S')
        ft['feature_type'] = np.array(['Gene Expression'] * mem.n_vars, dtype='S')
        ft['genome'] = np.array(['GRCh38'] * mem.n_vars, dtype='S')
    a = read_lazy(tmp_path/'f.h5', chunk_cells=128)
    ref = sc.read_10x_h5(tmp_path/'f.h5'); ref.var_names_make_unique()
    assert (
        a.uns['x_is'] == 'counts'
        and list(a.obs_names) == list(ref.obs_names)
        and list(a.var_names) == list(ref.var_names)
    )
    assert abs(a.X.compute() - ref.X).max() == 0

def test_dask_path_equals_in_memory_path(both):
    mem, lz = both
    assert isinstance(lz.X, da.Array) and sp.issparse(mem.X)
    assert mem.shape == lz.shape and (mem.obs_names == lz.obs_names).all() and (mem.var_names == lz.var_names).all()
    for c in ('total_counts', 'n_genes_by_counts', 'pct_counts_mt', 'pct_counts_ribo'):
        assert np.allclose(mem.obs[c], lz.obs[c], rtol=1e-5), c
    assert mem.uns['qc_pass']['n_kept'] == lz.uns['qc_pass']['n_kept'] < 1500  # min_genes=700 drops some cells
    assert mem.n_obs > 300
    assert abs(mem.X - lz.X.compute()).max() < 1e-5
    assert (
        mem.var.highly_variable.to_numpy() == lz.var.highly_variable.to_numpy()
    ).all() and mem.var.highly_variable.sum() == 800
    assert pc_corr(mem.obsm['X_pca'], lz.obsm['X_pca']).min() > 0.9999
    assert np.allclose(np.abs(mem.obsm['X_pca']), np.abs(lz.obsm['X_pca']), atol=2e-3)
    assert np.allclose(mem.uns['pca']['variance'], lz.uns['pca']['variance'], rtol=1e-5)

def test_chunked_steps_match_scanpy(both):
    mem, _ = both
    ref = mem.copy(); del ref.var['highly_variable']
    sc.pp.highly_variable_genes(ref, n_top_genes=800, flavor='seurat')
    assert (ref.var.highly_variable == mem.var.highly_variable).all()
    d = ref[:, ref.var.highly_variable.to_numpy()].copy(); sc.pp.scale(d, max_value=10)
    sc.pp.pca(d, n_comps=15, svd_solver='arpack', random_state=0)
    assert pc_corr(mem.obsm['X_pca'], d.obsm['X_pca'])[:10].min() > 0.999
    assert np.allclose(mem.uns['pca']['variance'][:10], d.uns['pca']['variance'][:10], rtol=1e-3)

def test_normalise_does_not_copy_float32_counts(h5):
    a = h5[0][:200].copy()
    before = a.X.indices
    normalise(a)
    assert a.X.indices is before and 'counts' not in a.layers and a.uns['x_is'] == 'lognorm'  # X itself is not copied
    assert np.allclose(np.expm1(a.X).sum(1), 1e4, rtol=1e-4)

def test_drop_failed_subsets_in_place_like_scanpy(h5):
    syn = h5[0]
    a = syn.copy(); qc_flags(a, min_genes=800); keep = a.obs.qc_pass.to_numpy()
    assert 0 < keep.sum() < len(keep)
    data = a.X.data
    a = drop_failed(a, min_cells=30)
    r = syn[keep].copy(); sc.pp.filter_genes(r, min_cells=30)
    assert np.shares_memory(a.X.data, data)  # entries moved in place, no second X
    assert a.shape == r.shape and (a.obs_names == r.obs_names).all() and (a.var_names == r.var_names).all()
    assert (
        abs(a.X - r.X).max() == 0
        and a.X.has_canonical_format
        and (a.var['n_cells'].to_numpy() == r.var['n_cells'].to_numpy()).all()
    )

def test_local_cluster_is_used_and_closed(h5):
    _, p = h5
    a = read_lazy(p, chunk_cells=500)
    with dask_client(n_workers=1, threads_per_worker=1, processes=False) as client:
        assert dask.base.get_scheduler() == client.get
        s = a.X.map_blocks(
            lambda b: np.asarray(b.sum(0)), dtype=np.float32, meta=np.zeros((0, 0), np.float32)
        ).compute()
        assert len(client.cluster.workers) == 1
    assert client.status == 'closed' and client.cluster.status.name == 'closed'
    assert np.isclose(s.sum(), h5[0].X.sum(), rtol=1e-5)
    assert dask.base.get_scheduler() is None or dask.base.get_scheduler() != client.get

def test_bad_address_errors_clearly():
    with pytest.raises(ValueError, match='not a Dask scheduler address'):
        with dask_client('localhost'): pass
    with pytest.raises(ConnectionError, match=r'No Dask scheduler answered at tcp://127.0.0.1:9 within 1 s'):
        with dask_client('tcp://127.0.0.1:9', timeout=1): pass

def test_sampled_markers_agree_with_full():
    pb = load_dataset('pbmc3k'); normalise(pb)
    idx = sample_indices(pb.obs.cell_type, 1000, min_cells=30, seed=0)
    n, got = pb.obs.cell_type.value_counts(), pb.obs.cell_type.iloc[idx].value_counts()
    big = n[n * 1000 / pb.n_obs >= 30].index  # drawn at the common rate
    assert np.allclose(got[big] / n[big], 1000 / pb.n_obs, atol=0.005)  # the same rate for every cluster
    assert (
        got[n.index.difference(big)] == n.clip(upper=30)[n.index.difference(big)]
    ).all()  # the floor (all of a tiny one)
    full = rank_genes_sampled(pb, 'cell_type', n_cells=0, key_added=None)
    sampled = rank_genes_sampled(pb, 'cell_type', n_cells=1000, min_cells=30)
    ag = marker_agreement(full, sampled, n_genes=10)
    assert len(ag) == 9 and ag.overlap.mean() >= 0.85 and ag.overlap.min() >= 0.8 and ag.top1_same.mean() >= 0.4, ag
    assert pb.uns['markers']['params']['n_cells_used'] == len(idx) and pb.uns['markers']['params']['n_cells'] == 1000
    assert np.array_equal(sample_indices(pb.obs.cell_type, 1000, min_cells=30, seed=0), idx)  # seeded
    assert len(sample_indices(pb.obs.cell_type, 0)) == len(sample_indices(pb.obs.cell_type, 10**6)) == pb.n_obs  # all

def test_sampled_markers_read_only_drawn_rows_of_dask(both):
    mem, lz = both
    g = pd.Categorical(np.where(mem.obsm['X_pca'][:, 0] > 0, 'a', 'b'))
    mem.obs['g'] = g; lz.obs['g'] = g
    with dask.config.set(scheduler='threads'):
        t_lz = rank_genes_sampled(lz, 'g', n_cells=400, key_added=None)
    t_mem = rank_genes_sampled(mem, 'g', n_cells=400, key_added=None)
    pd.testing.assert_frame_equal(t_mem, t_lz)

def test_embed_batched_equals_embed(h5):
    from deepseq_nb.encoder import new_encoder, make_vocab, embed
    a = h5[0][:300].copy()
    enc = new_encoder(make_vocab(list(a.var_names)), d_model=16, nlayers=1, nhead=2, d_hid=32, max_len=32, seed=0)
    b = a.copy(); embed_batched(a, enc, batch_cells=128, n_threads=1); embed(b, enc, progress=False, n_threads=1)
    assert a.obsm['X_scgpt'].shape == (300, 16) and np.abs(a.obsm['X_scgpt'] - b.obsm['X_scgpt']).max() < 1e-4
    assert a.uns['scgpt']['params']['batch_cells'] == 128

def test_run_scaled_end_to_end(h5):
    mem, p = h5
    a = mem.copy()
    assert run_scaled(a, marker_cells=500, marker_min_cells=50, n_top_genes=800, n_pcs=15) is None  # in place
    st = a.uns['scale']['stages']
    assert list(st) == list(S.STAGES) and all(v >= 0 for v in st.values())
    assert a.obs.leiden.nunique() >= 3 and a.uns['markers']['params']['n_cells'] == 500
    assert a.uns['markers']['params']['n_cells_used'] <= 500 + 50 * a.obs.leiden.nunique()
    assert 'deepseq_label' in a.obs and a.obs.deepseq_label.notna().all()
    seen = []
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cl:  # a cluster given by address
        d = run_scaled(
            p,
            dask=True,
            address=cl.scheduler_address,
            marker_cells=500,
            marker_min_cells=50,
            n_top_genes=800,
            n_pcs=15,
            on_stage=seen.append,
        )
        assert cl.status.name == 'running'  # a cluster given by address is left running
    assert seen == list(S.STAGES) + ['done'] and isinstance(d.X, da.Array)  # end to end without loading X
    assert d.uns['scale']['dask'] and d.uns['scale']['address'].startswith('inproc://') and d.n_obs == a.n_obs
    assert pc_corr(a.obsm['X_pca'], d.obsm['X_pca']).min() > 0.9999
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(a.obs.leiden, d.obs.leiden) > 0.9
    assert (a.obs.deepseq_label.astype(str).to_numpy() == d.obs.deepseq_label.astype(str).to_numpy()).mean() > 0.9
    seen.clear(); e = run_scaled(p, until='hvg', n_top_genes=800, on_stage=seen.append)
    assert (
        seen == ['read', 'qc', 'normalise', 'hvg', 'pca', 'done']
        and 'X_pca' not in e.obsm
        and e.var.highly_variable.sum() == 800
    )
    with pytest.raises(ValueError, match='until must be one of'): run_scaled(p, until='umap')

def _blobs(n=3000, d=20, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) + 6 * rng.normal(size=(12, d))[rng.integers(0, 12, n)]).astype(np.float32)

def test_knn_graph_exact_matches_sklearn_and_scanpy_reads_it_fast():
    from sklearn.neighbors import NearestNeighbors
    X = _blobs()
    t = KNNGraph(10, method='exact')
    G = t.fit_transform(X)
    assert t.method_ == 'exact' and t.recall_ == 1.0 and G.shape == (3000, 3000) and (G.getnnz(1) == 10).all()
    I, D = G.indices.reshape(3000, 10), G.data.reshape(3000, 10)
    assert (I[:, 0] == np.arange(3000)).all() and (D[:, 0] == 0).all()
    assert (np.diff(D, axis=1) >= -1e-5).all()  # distance order inside each row
    d, ref = NearestNeighbors(n_neighbors=10).fit(X).kneighbors(X)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, ref)]) > 0.999
    assert np.allclose(D, d, atol=1e-3)
    a = ad.AnnData(np.zeros((3000, 1), np.float32), obsm={'X_pca': X})
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)  # scanpy warns when it must fall back to its slow row loop
        sc.pp.neighbors(a, use_rep='X_pca', transformer=KNNGraph(10, method='exact'))
    assert (np.asarray((a.obsp['distances'] > 0).sum(1)).ravel() == 9).all() and a.uns['neighbors']['params'][
        'n_neighbors'
    ] == 10

def test_knn_graph_puts_each_cell_first_even_with_duplicates():
    X = _blobs(500); X[1] = X[0]; X[2] = X[0]
    I = KNNGraph(5, method='exact').fit_transform(X).indices.reshape(500, 5)
    assert (I[:, 0] == np.arange(500)).all()
    assert set(I[0, 1:3]) == {1, 2} and set(I[1, 1:3]) == {0, 2} and len(set(I[0])) == 5

def test_knn_graph_nndescent_reports_its_recall():
    X = _blobs(20_000, d=30)
    nd = KNNGraph(15, method='nndescent', seed=0); G = nd.fit_transform(X)
    assert (
        nd.method_ == 'nndescent'
        and 0.9 < nd.recall_ <= 1
        and (G.indices.reshape(-1, 15)[:, 0] == np.arange(20_000)).all()
    )
    ex = KNNGraph(15, method='exact').fit_transform(X)
    found = (
        np.mean([len(np.intersect1d(a, b)) - 1 for a, b in zip(G.indices.reshape(-1, 15), ex.indices.reshape(-1, 15))])
        / 14
    )
    assert abs(found - nd.recall_) < 0.03  # the sampled recall estimates the recall over every cell
    assert KNNGraph(15, exact_max=1000).fit(X).method_ == 'nndescent' and KNNGraph(15).fit(X).method_ == 'exact'
    with pytest.raises(ValueError, match="method must be"): KNNGraph(15, method='ivf').fit(X)
