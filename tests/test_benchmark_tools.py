"The depth thinning of `benchmarks/annotation_resolution.py`: counts read back from log-normalised tables, thinned."
import importlib.util
from pathlib import Path

import numpy as np, pytest, scipy.sparse as sp
from deepseq_nb.data import load


def _bench():
    p = Path(__file__).resolve().parents[1]/'benchmarks/annotation_resolution.py'
    spec = importlib.util.spec_from_file_location('annotation_resolution', p)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m

@pytest.mark.parametrize('name, log', [('testis_mca', 'ln'), ('pancreas_wang', 'log2')])
def test_counts_of_reads_back_whole_counts(name, log):
    "Each cell's values are a log of whole counts times one factor: the counts come back, in the right log base."
    a = load(name)
    C, base = _bench().counts_of(a)
    assert base == log
    X = sp.csr_matrix(a.X, dtype=np.float64)
    assert C.data.min() == 1 and (np.diff(C.indptr) == np.diff(X.indptr)).all()  # the same genes detected
    f, inverse = _bench().LOGS[base]
    back = f(X.data); scale = np.repeat(np.add.reduceat(back, X.indptr[:-1]) / np.add.reduceat(C.data, C.indptr[:-1]),
                                        np.diff(X.indptr))
    assert np.allclose(inverse(C.data * scale), X.data, atol=1e-3)  # whole counts, rescaled, give the values back


def test_counts_of_refuses_scaled_values():
    "z-scored values are no log of counts: nothing is read back."
    a = load('testis_mca')[:50].copy()
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    a.X = sp.csr_matrix((X - X.mean(0)) / (X.std(0) + 1))
    assert _bench().counts_of(a) == (None, None)


def test_thinned_keeps_the_share_asked():
    "Half the counts: every cell's total halves (to the count), fewer genes are detected, and the log is the same."
    b = _bench()
    a = load('testis_mca')
    C = b.counts_of(a)[0]
    t = b.thinned(a, 0.5, seed=0)
    C2 = b.counts_of(t)[0]
    # counts come back up to each cell's smallest one, so compare what is detected: fewer genes, none gained
    assert (np.diff(C2.indptr) <= np.diff(C.indptr)).all() and np.diff(C2.indptr).sum() < 0.8*np.diff(C.indptr).sum()
    same = b.thinned(a, 1.0, seed=0)
    assert np.allclose(sp.csr_matrix(same.X).toarray(), sp.csr_matrix(a.X).toarray(), atol=1e-5)
    c = load('pbmc3k')[:200].copy()
    h = b.thinned(c, 0.5, seed=1)
    tot, tot2 = np.asarray(c.X.sum(1)).ravel(), np.asarray(h.X.sum(1)).ravel()
    assert (tot2 == np.floor(0.5*tot)).all()
