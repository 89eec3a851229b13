"""Time and peak memory of QC + clustering + markers: deepseq_nb vs the same scanpy calls written plainly.

No UMAP: it is a picture, not an input to markers.

Usage: python benchmarks/pipeline.py [--sizes pbmc3k 50000 200000] [--repeats 1]
Each (size, implementation) runs in a fresh subprocess so peak RSS is its own. Synthetic data are resampled from
the PBMC3k counts (cells drawn with replacement, each count redrawn from a Poisson with that mean), seed 0.
Prints a table: seconds and peak RSS (GiB) per implementation and the ratio ours/plain (target <= 1.05).
"""
import argparse, json, os, resource, subprocess, sys, time
os.environ.setdefault('OMP_NUM_THREADS', '2'); os.environ.setdefault('NUMBA_NUM_THREADS', '2')

def synth(n, seed=0):
    "An AnnData of `n` cells resampled from PBMC3k counts."
    import numpy as np, anndata as ad
    from deepseq_nb.data import load_dataset
    base = load_dataset('pbmc3k')
    if n == 'pbmc3k': return base
    rng = np.random.default_rng(seed)
    X = base.X[rng.integers(0, base.n_obs, int(n))].tocsr()
    X.data = rng.poisson(X.data).astype(np.float32); X.eliminate_zeros()
    return ad.AnnData(X, var=base.var[[]].copy())

def ours(a):
    from deepseq_nb.qc import filter_cells
    from deepseq_nb.cluster import cluster, top_markers
    filter_cells(a, strategy='threshold', min_genes=200, key_added='qc_pass')
    a = a[a.obs['qc_pass'].to_numpy()].copy()
    cluster(a, seed=0, umap=False)
    top_markers(a, n_genes=10)
    return a

def plain(a):
    import scanpy as sc
    a.var['mt'] = a.var_names.str.startswith('MT-')
    sc.pp.calculate_qc_metrics(a, qc_vars=['mt'], percent_top=None, log1p=False, inplace=True)
    a = a[a.obs['n_genes_by_counts'].to_numpy() >= 200].copy()
    a.layers['counts'] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4); sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=2000, flavor='seurat')
    sub = a[:, a.var['highly_variable'].to_numpy()].copy(); sc.pp.scale(sub, max_value=10)
    sc.pp.pca(sub, n_comps=40, random_state=0, svd_solver='arpack'); a.obsm['X_pca'] = sub.obsm['X_pca']
    sc.pp.neighbors(a, n_neighbors=15, random_state=0)
    sc.tl.leiden(a, resolution=1.0, flavor='igraph', n_iterations=2, directed=False, random_state=0)
    mask = ~a.var_names.str.match(r'^(MT-|mt-|RP[SL]\d|Rp[sl]\d)')
    sc.tl.rank_genes_groups(a, 'leiden', method='wilcoxon', use_raw=False, mask_var=mask, n_genes=100)
    return a

def child(size, impl):
    a = synth(size)
    import scanpy as sc; sc.settings.n_jobs = 2
    t0 = time.perf_counter(); out = {'ours': ours, 'plain': plain}[impl](a); dt = time.perf_counter() - t0
    print(json.dumps(dict(size=str(size), impl=impl, n_cells=int(out.n_obs), seconds=dt,
                          peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', nargs='+', default=['pbmc3k', '50000', '200000'])
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child: return child(a.child[0] if a.child[0] == 'pbmc3k' else int(a.child[0]), a.child[1])
    rows = []
    for s in a.sizes:
        res = {}
        for impl in ('plain', 'ours'):
            runs = [
                json.loads(
                    subprocess.run(
                        [sys.executable, __file__, '--child', s, impl], capture_output=True, text=True, check=True
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                for _ in range(a.repeats)
            ]
            res[impl] = dict(
                seconds=min(r['seconds'] for r in runs), peak_gib=max(r['peak_gib'] for r in runs), n=runs[0]['n_cells']
            )
        rows.append((s, res))
        r = res
        print(
            f"{s:>8} cells={r['ours']['n']:>7}  plain {r['plain']['seconds']:7.1f} s {r['plain']['peak_gib']:5.2f} "
            "GiB | "
            f"ours {r['ours']['seconds']:7.1f} s {r['ours']['peak_gib']:5.2f} GiB | ratio time "
            f"{r['ours']['seconds'] / r['plain']['seconds']:.3f} "
            f"mem {r['ours']['peak_gib'] / r['plain']['peak_gib']:.3f}",
            flush=True,
        )

if __name__ == '__main__': main()
