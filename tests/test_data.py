"Readers and input checks: every bad input gets an error that says what to do."
import gzip, shutil
import numpy as np, pandas as pd, pytest, scipy.io, scipy.sparse as sp, anndata as ad
from deepseq_nb.data import data_dir, read, read_10x_mtx, load_dataset, InputError, DATASETS

RAW = data_dir()/'tenx_toy/raw_gene_bc_matrices/GRCh38'
FILT = data_dir()/'tenx_toy/filtered_gene_bc_matrices/GRCh38'

def _write_v3(src, dst, ids=True):
    "Rewrite a v2 mtx dir as Cell Ranger v3: gzipped, features.tsv.gz with 3 columns."
    dst.mkdir(parents=True)
    genes = pd.read_csv(src/'genes.tsv', sep='\t', header=None)
    feats = pd.DataFrame(
        {0: [f'ENSG{i:011d}' for i in range(len(genes))] if ids else genes[0], 1: genes[1], 2: 'Gene Expression'}
    )
    feats.loc[len(feats)] = ['ab1', 'CD3_TotalSeqB', 'Antibody Capture']
    m = scipy.io.mmread(str(src/'matrix.mtx')).tocsr()
    m = sp.vstack([m, sp.csr_matrix(np.ones((1, m.shape[1])))]).tocoo()
    with gzip.open(dst/'features.tsv.gz', 'wt') as f: feats.to_csv(f, sep='\t', header=False, index=False)
    with gzip.open(dst/'matrix.mtx.gz', 'wb') as f: scipy.io.mmwrite(f, m, field='integer')
    with open(src/'barcodes.tsv', 'rb') as i, gzip.open(dst/'barcodes.tsv.gz', 'wb') as o: shutil.copyfileobj(i, o)

def test_read_10x_v2():
    a = read(RAW)
    assert a.shape == (1289, 226) and a.uns['x_is'] == 'counts'
    assert 'MS4A1' in a.var_names and a.X.sum() == scipy.io.mmread(str(RAW/'matrix.mtx')).sum()

def test_read_10x_v3_gz_drops_antibody_capture(tmp_path):
    _write_v3(FILT, tmp_path/'v3')
    a = read(tmp_path/'v3')
    assert a.shape == (62, 226) and 'CD3_TotalSeqB' not in a.var_names
    assert a.var['gene_ids'].str.startswith('ENSG').all()
    b = read(tmp_path/'v3', var_names='gene_ids')  # IDs as names: symbols are there, so they are used
    assert 'MS4A1' in b.var_names

def test_ensembl_ids_without_symbols(tmp_path):
    a = ad.AnnData(
        sp.csr_matrix(np.ones((5, 3), np.float32)),
        var=pd.DataFrame(index=['ENSG00000000001', 'ENSG00000000002', 'ENSG00000000003']),
    )
    a.write_h5ad(tmp_path/'ids.h5ad')
    with pytest.raises(InputError, match='Ensembl gene IDs.*symbol'): read(tmp_path/'ids.h5ad')

def test_duplicate_genes_made_unique(tmp_path):
    a = ad.AnnData(sp.csr_matrix(np.ones((4, 3), np.float32)), var=pd.DataFrame(index=['CD3E', 'MS4A1', 'x']))
    a.var_names = ['CD3E', 'MS4A1', 'CD3E']
    a.write_h5ad(tmp_path/'dup.h5ad')
    with pytest.warns(UserWarning, match='made unique'): b = read(tmp_path/'dup.h5ad')
    assert b.var_names.is_unique and list(b.var_names) == ['CD3E', 'MS4A1', 'CD3E-1']

def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match='No such file'): read(tmp_path/'nope.h5ad')
    (tmp_path/'x.loom').write_text('x')
    with pytest.raises(InputError, match='Cannot tell the format'): read(tmp_path/'x.loom')
    (tmp_path/'emptydir').mkdir()
    with pytest.raises(InputError, match='without matrix.mtx'): read(tmp_path/'emptydir')

def test_incomplete_10x_dir(tmp_path):
    d = tmp_path/'m'; d.mkdir(); shutil.copy(RAW/'matrix.mtx', d)
    with pytest.raises(FileNotFoundError, match='missing barcodes.tsv, features.tsv or genes.tsv'): read_10x_mtx(d)

def test_unreadable_h5ad(tmp_path):
    (tmp_path/'bad.h5ad').write_bytes(b'not hdf5 at all')
    with pytest.raises(InputError, match='Could not read .*bad.h5ad as h5ad'): read(tmp_path/'bad.h5ad')

def test_empty_matrix(tmp_path):
    ad.AnnData(sp.csr_matrix((3, 4), dtype=np.float32), var=pd.DataFrame(index=list('ABCD'))).write_h5ad(
        tmp_path / 'e.h5ad'
    )
    with pytest.raises(InputError, match='empty'): read(tmp_path/'e.h5ad')

def test_lognorm_where_counts_needed(tmp_path):
    a = load_dataset('pbmc3k')[:50, :200].copy()
    df = pd.DataFrame(np.log1p(a.X.toarray()), index=a.obs_names, columns=a.var_names)
    df.to_csv(tmp_path/'ln.csv')
    with pytest.raises(InputError, match="x_is='lognorm'"): read(tmp_path/'ln.csv', x_is='counts')
    assert read(tmp_path/'ln.csv').uns['x_is'] == 'lognorm'
    from deepseq_nb.qc import filter_cells
    with pytest.raises(InputError, match='needs raw counts'): filter_cells(load_dataset('pancreas_xin'))

def test_csv_orientation(tmp_path):
    a = load_dataset('pbmc3k')[:30, :100].copy()
    df = pd.DataFrame(a.X.toarray(), index=a.obs_names, columns=a.var_names)
    df.to_csv(tmp_path/'cells.csv'); df.T.to_csv(tmp_path/'genes.tsv', sep='\t')
    assert read(tmp_path/'cells.csv').shape == (30, 100)
    assert read(tmp_path/'genes.tsv', orientation='genes_x_cells').shape == (30, 100)
    with pytest.raises(InputError, match="orientation='genes_x_cells'"): read(tmp_path/'genes.tsv')
    with pytest.raises(InputError, match="orientation='cells_x_genes'"):
        read(tmp_path / 'cells.csv', orientation='genes_x_cells')

def test_every_bundled_dataset_loads():
    for name in DATASETS:
        a = load_dataset(name)
        assert a.n_obs > 0 and a.uns['dataset']['name'] == name and a.uns['x_is'] in ('counts', 'lognorm')
    with pytest.raises(KeyError, match='Bundled datasets'): load_dataset('pbmc4k')
