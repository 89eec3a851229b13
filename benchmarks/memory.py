"""Queries per second of the reference memory (deepseq_nb.memory.CellMemory), exact Flat vs IVF-Flat, with recall@10.

Usage: python benchmarks/memory.py [--sizes 10000 100000 1000000] [--dims 128 512] [--queries 1000] [--nprobe 8 16 32]

Data: `synthetic_embeddings` (clustered: 100 cell types in lineages, low-rank Gaussian types in a 32-d latent space,
uneven type sizes), cosine metric; the queries are fresh cells from the same mixture, searched as one batch.
Flat is exact: its neighbours are the ground truth of recall@10 (the share of the true 10 nearest neighbours found),
and Flat itself is checked against a float64 brute force on 100 queries. IVF uses the memory's defaults
(nlist = 4*sqrt(n) clipped to [16, 1024], trained on <= 64 points per list, seed 0) at each nprobe.
Build time is `CellMemory.add` of all entries (normalisation included; k-means training included for IVF); index GiB
is the size of the faiss index as `faiss.serialize_index` writes it (vectors, ids, and IVF centroids and lists),
which is what the index holds in memory, and obs MiB the memory of the entries' metadata frame.
faiss and BLAS run on 2 threads. Prints one row per (entries, dim, index, nprobe).
"""
import argparse, gc, os, resource, time
for v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'): os.environ.setdefault(v, '2')
# imported after the thread settings: BLAS reads them when it loads
import numpy as np, pandas as pd  # noqa: E402

def _brute(X:np.ndarray, Q:np.ndarray, k:int, chunk:int=200_000)->np.ndarray:
    "Exact cosine top-k ids by float64 dot products on L2-normalised rows (the reference for Flat)."
    Qn = Q.astype(np.float64); Qn /= np.linalg.norm(Qn, axis=1, keepdims=True)
    best_s, best_i = np.full((len(Q), 0), -np.inf), np.zeros((len(Q), 0), np.int64)
    for s in range(0, len(X), chunk):
        B = X[s:s+chunk].astype(np.float64); B /= np.linalg.norm(B, axis=1, keepdims=True)
        S = np.concatenate([best_s, Qn @ B.T], 1)
        I = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + len(B)), (len(Q), len(B)))], 1)
        top = np.argpartition(-S, k-1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(S, top, 1), np.take_along_axis(I, top, 1)
    return np.take_along_axis(best_i, np.argsort(-best_s, 1), 1)

def recall_at(found:np.ndarray, truth:np.ndarray)->float:
    "Mean share of the true neighbours (rows of `truth`) found in the rows of `found`."
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(found, truth)]))

def _held(m)->dict:
    "GiB of the serialised faiss index of the 'frozen' space and MiB of the obs frame."
    import faiss

    return dict(
        index_gib=faiss.serialize_index(m._index['frozen']).nbytes / 2**30,
        obs_mib=m.obs.memory_usage(deep=True).sum() / 2**20,
    )

def _timed_search(m, Q, k):
    t0 = time.perf_counter(); nb = m.search(Q, k); return nb, len(Q) / (time.perf_counter() - t0)

def memory_benchmark(sizes=(10**4, 10**5, 10**6), # numbers of reference entries
                     dims=(128, 512), # embedding dimensions (scGPT's d_model is 512)
                     n_queries:int=1000, # queries per search batch
                     nprobes=(8, 16, 32), # IVF lists probed per query
                     k:int=10, # neighbours (recall@k)
                     threads:int=2, # faiss threads
                     seed:int=0, # data seed
                     verbose:bool=True, # print each row as it is measured
                    )->pd.DataFrame:
    "Build time, queries/s and recall@k of Flat and IVF-Flat memories for each size and dimension."
    from deepseq_nb.memory import CellMemory
    from deepseq_nb.vector_index import set_threads, synthetic_embeddings
    set_threads(threads)
    rows = []
    def emit(r):
        rows.append(r)
        if verbose:
            print(
                f"{r['entries']:>9,} {r['dim']:>4} {r['index']:<8} {r['nlist'] or '':>6} {r['nprobe'] or '':>6} "
                f"{r['build_s']:>8.2f} {r['index_gib']:>9.3f} {r['obs_mib']:>7.1f} {r['queries_per_s']:>12,.0f} "
                f"{r['recall_at_10']:>10.4f}",
                flush=True,
            )

    if verbose:
        print(
            f"{'entries':>9} {'dim':>4} {'index':<8} {'nlist':>6} {'nprobe':>6} {'build_s':>8} {'index_GiB':>9} "
            f"{'obs_MiB':>7} {'queries/s':>12} {'recall@10':>10}"
        )
    for dim in dims:
        for n in sizes:
            X, y = synthetic_embeddings(n + n_queries, dim, n_types=100, seed=seed)
            Q, X, y = X[n:].copy(), X[:n], y[:n]
            obs = {'label': y}
            t0 = time.perf_counter()
            m = CellMemory(index='flat')
            m.add(X, obs, space='frozen')
            tb = time.perf_counter() - t0
            nb, qps = _timed_search(m, Q, k)
            truth = nb.ids
            exact = recall_at(truth[:100], _brute(X, Q[:100], k))
            emit(
                dict(
                    entries=n,
                    dim=dim,
                    index='Flat',
                    nlist=None,
                    nprobe=None,
                    build_s=tb,
                    **_held(m),
                    queries_per_s=qps,
                    recall_at_10=exact,
                )
            )
            del m, nb; gc.collect()
            t0 = time.perf_counter()
            m = CellMemory(index='ivf')
            m.add(X, obs, space='frozen')
            tb = time.perf_counter() - t0
            idx, held = m._index['frozen'], _held(m)
            for p in nprobes:
                idx.nprobe = p
                nb, qps = _timed_search(m, Q, k)
                emit(
                    dict(
                        entries=n,
                        dim=dim,
                        index='IVF-Flat',
                        nlist=int(idx.nlist),
                        nprobe=p,
                        build_s=tb,
                        **held,
                        queries_per_s=qps,
                        recall_at_10=recall_at(nb.ids, truth),
                    )
                )
            del m, nb, X, Q, y, obs; gc.collect()
    return pd.DataFrame(rows)

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', nargs='+', type=int, default=[10**4, 10**5, 10**6])
    p.add_argument('--dims', nargs='+', type=int, default=[128, 512])
    p.add_argument('--queries', type=int, default=1000)
    p.add_argument('--nprobe', nargs='+', type=int, default=[8, 16, 32])
    p.add_argument('--threads', type=int, default=2)
    a = p.parse_args()
    t0 = time.perf_counter()
    memory_benchmark(a.sizes, a.dims, a.queries, a.nprobe, threads=a.threads)
    print(
        f"total {time.perf_counter() - t0:.0f} s, peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    )

if __name__ == '__main__': main()
