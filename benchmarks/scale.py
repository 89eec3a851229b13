"""Time and peak memory per stage of the scaled pipeline (deepseq_nb.scale.run_scaled) at 10^4-10^6 cells:
in memory vs Dask, against plain scanpy, with the fitted growth exponent of each stage.

Usage: python benchmarks/scale.py [--sizes 10000 100000 1000000] [--modes plain memory dask] [--dask]
                                  [--plain-max 100000] [--agreement-max 100000] [--workdir /tmp/deepseq_scale]

Data: `synthetic_counts(n)` resampled from the bundled PBMC3k counts (each cell a binomial mix of 4 cells of one type,
seed 0), written once per size to WORKDIR/synthetic_{n}.h5ad in 50,000-cell chunks and read back by every run.
Each (size, mode) runs in a fresh subprocess; a thread samples the RSS of that process and its children (Dask
workers included) every 50 ms, and the peak of each stage is the largest sample taken while it ran.
Modes:
  plain   the same stages written as plain scanpy calls (benchmarks/pipeline.py's `plain`): read_h5ad, QC metrics +
          >= 200 genes, normalize_total + log1p (counts kept in a layer), seurat HVG, densifying sc.pp.scale +
          arpack PCA, neighbours, Leiden, Wilcoxon markers on every cell (no annotation).
  memory  run_scaled(path) in memory: copy-free normalisation, chunked HVG, sparse blockwise PCA, neighbours, Leiden,
          Wilcoxon markers from a uniform sample of [scale] marker_cells cells (>= marker_min_cells per cluster),
          kb annotation.
  dask    run_scaled(path, dask=True): lazy read, QC -> PCA on a LocalCluster (2 worker processes, 1 thread each);
          then neighbours and Leiden in memory on X_pca, markers from the sampled cells' rows fetched from the lazy
          matrix, kb annotation. X is never held in memory, which is how 10^6 cells (7 GB of CSR) fit.
  embed   read_lazy(path), then embed_batched with the [scale] embed_batch_cells (10,000) and the default encoder:
          cells tokenised and embedded a batch at a time from the lazy file, so the peak should not grow with the
          number of cells (only the (cells x d_model) float32 result does). Not in the default modes (10^5 cells take
          minutes on 2 cores); run it with --modes embed.
Marker agreement (sizes <= --agreement-max): full Wilcoxon markers on every cell of the memory run vs the sampled ones
(share of each cluster's top-10 found, top gene the same), and the default kb labels with each (the engine reads X;
the marker table only breaks its ties), per cluster and per cell.
Prints one table per quantity (seconds, peak GiB) with stages as columns, the growth exponent b of t ~ n^b fitted
per stage over the sizes run (log-log least squares), the ratio memory/plain of the totals, and the agreement.
"""
import argparse, json, os, subprocess, sys, threading, time, warnings
for v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMBA_NUM_THREADS'):
    os.environ.setdefault(v, '2')
warnings.filterwarnings('ignore')

STAGES = ('read', 'qc', 'normalise', 'hvg', 'pca', 'neighbours', 'leiden', 'markers', 'annotate', 'encoder', 'embed')

class Sampler:
    "Peak RSS (GiB) of this process and its children, per stage."
    def __init__(self, dt=0.05):
        import psutil
        self.p, self.dt, self.stage, self.peak, self._stop = psutil.Process(), dt, None, {}, False
        threading.Thread(target=self._run, daemon=True).start()
    def rss(self):
        tot = 0
        for q in [self.p] + self.p.children(recursive=True):
            try: tot += q.memory_info().rss
            except Exception: pass
        return tot / 2**30
    def _run(self):
        while not self._stop:
            s = self.stage
            if s: self.peak[s] = max(self.peak.get(s, 0), self.rss())
            time.sleep(self.dt)
    def __call__(self, name):
        s = self.stage
        if s: self.peak[s] = max(self.peak.get(s, 0), self.rss())
        self.stage = None if name == 'done' else name
        if self.stage: self.peak[self.stage] = self.rss()

def plain(path, tick):
    "The pipeline as plain scanpy calls (as benchmarks/pipeline.py), stage by stage."
    import anndata as ad, scanpy as sc
    tick('read'); a = ad.read_h5ad(path)
    tick('qc'); a.var['mt'] = a.var_names.str.startswith('MT-')
    sc.pp.calculate_qc_metrics(a, qc_vars=['mt'], percent_top=None, log1p=False, inplace=True)
    a = a[a.obs['n_genes_by_counts'].to_numpy() >= 200].copy(); sc.pp.filter_genes(a, min_cells=3)
    tick('normalise'); a.layers['counts'] = a.X.copy(); sc.pp.normalize_total(a, target_sum=1e4); sc.pp.log1p(a)
    tick('hvg'); sc.pp.highly_variable_genes(a, n_top_genes=2000, flavor='seurat')
    tick('pca'); sub = a[:, a.var['highly_variable'].to_numpy()].copy(); sc.pp.scale(sub, max_value=10)
    sc.pp.pca(sub, n_comps=40, random_state=0, svd_solver='arpack'); a.obsm['X_pca'] = sub.obsm['X_pca']; del sub
    tick('neighbours'); sc.pp.neighbors(a, n_neighbors=15, random_state=0)
    tick('leiden'); sc.tl.leiden(a, resolution=1.0, flavor='igraph', n_iterations=2, directed=False, random_state=0)
    tick('markers'); mask = ~a.var_names.str.match(r'^(MT-|mt-|RP[SL]\d|Rp[sl]\d)')
    sc.tl.rank_genes_groups(a, 'leiden', method='wilcoxon', use_raw=False, mask_var=mask, n_genes=100)
    tick('done'); return a

def agreement(a):
    "Sampled vs full markers, and the kb labels from each; a second seed of the sample as the noise floor."
    from deepseq_nb.scale import rank_genes_sampled, marker_agreement
    from deepseq_nb.annotate import annotate
    sampled, P = a.uns['markers'], a.uns['markers']['params']
    t0 = time.perf_counter()
    full = rank_genes_sampled(a, 'leiden', n_cells=0, key_added='markers_full')
    t_full = time.perf_counter() - t0
    seed2 = rank_genes_sampled(
        a, 'leiden', n_cells=P['n_cells'], min_cells=P['min_cells'], seed=P['seed'] + 1, key_added='markers_seed2'
    )
    ag = marker_agreement(full, sampled['table'], n_genes=10)
    mine, size = a.uns['deepseq']['table'].set_index('cluster')['label'], a.obs['leiden'].astype(str).value_counts()
    def same(key):
        "The default kb labels with the marker table uns[key] in place of the run's vs the run's: clusters, cells."
        b = a.copy(); b.uns['markers'] = a.uns[key]  # the engine reads X; the marker table breaks its ties
        annotate(b, groupby='leiden', backend='kb')
        eq = mine == b.uns['deepseq']['table'].set_index('cluster')['label'].reindex(mine.index)
        return float(eq.mean()), float(size.reindex(eq.index[eq].astype(str)).sum() / size.sum())
    (lc, lz), (sc_, sz) = same('markers_full'), same('markers_seed2')
    return dict(full_markers_s=t_full, overlap=float(ag['overlap'].mean()), overlap_min=float(ag['overlap'].min()),
                top1_same=float(ag['top1_same'].mean()), label_same_clusters=lc, label_same_cells=lz,
                seed_overlap=float(marker_agreement(seed2, sampled['table'], n_genes=10)['overlap'].mean()),
                seed_label_same_clusters=sc_, seed_label_same_cells=sz, n_cells_used=int(P['n_cells_used']))

def child(n, mode, path, agree):
    import scanpy as sc; sc.settings.n_jobs = 2
    S = Sampler()
    t = {}; cur = [None, 0.0]
    def tick(name):
        now = time.perf_counter()
        if cur[0]: t[cur[0]] = now - cur[1]
        cur[:] = [name, now]; S(name)
    t0 = time.perf_counter()
    if mode == 'plain': a = plain(path, tick)
    elif mode == 'embed':
        from deepseq_nb.scale import read_lazy, embed_batched, scale_settings
        from deepseq_nb.pretrain import default_encoder
        tick('read'); a = read_lazy(path)
        tick('encoder'); enc = default_encoder(progress=False)
        tick('embed'); embed_batched(a, enc, batch_cells=scale_settings()['embed_batch_cells'])
        tick('done')
    else:
        from deepseq_nb.scale import run_scaled
        a = run_scaled(path, dask=mode == 'dask', on_stage=tick)
    total = time.perf_counter() - t0
    out = dict(
        n=n,
        mode=mode,
        n_cells=int(a.n_obs),
        seconds=t,
        cells_per_s=a.n_obs / t['embed'] if 'embed' in t else None,
        peak_gib=S.peak,
        total_s=total,
        n_clusters=int(a.obs['leiden'].nunique()) if 'leiden' in a.obs else None,
        peak_all_gib=max(S.peak.values()),
    )
    if agree and mode == 'memory': out['agreement'] = agreement(a)
    print('RESULT ' + json.dumps(out), flush=True)

def ensure_data(n, workdir):
    p = os.path.join(workdir, f'synthetic_{n}.h5ad')
    if not os.path.exists(p):
        subprocess.run(
            [
                sys.executable,
                '-c',
                f"from deepseq_nb.scale import synthetic_counts; synthetic_counts({n}, path={p!r}, seed=0)",
            ],
            check=True,
        )
    return p

def exponents(rows, mode):
    "Fitted b of seconds ~ n^b per stage (and total) over the sizes measured in `mode`."
    import numpy as np
    r = [x for x in rows if x['mode'] == mode]
    out = {}
    for s in list(STAGES) + ['total']:
        pts = [(x['n'], x['total_s'] if s == 'total' else x['seconds'].get(s)) for x in r]
        pts = [(n, v) for n, v in pts if v and v > 0]
        if len(pts) >= 2: out[s] = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])
    return out

def table(rows):
    stages = [s for s in STAGES if any(s in r['seconds'] for r in rows)]
    for what, key, fmt in (('seconds', 'seconds', '{:8.1f}'), ('peak RSS GiB', 'peak_gib', '{:8.2f}')):
        print(f"\n{what}\n{'cells':>9} {'mode':<7}" + ''.join(f'{s:>11}' for s in stages) + f"{'total':>11}")
        for r in rows:
            tot = r['total_s'] if key == 'seconds' else r['peak_all_gib']
            print(
                f"{r['n']:>9,} {r['mode']:<7}"
                + ''.join(f"{(fmt.format(r[key][s]) if s in r[key] else '-'):>11}" for s in stages)
                + f"{fmt.format(tot):>11}"
            )
    print(
        f"\ngrowth exponent b (seconds ~ cells^b)\n{'mode':<7}" + ''.join(f'{s:>11}' for s in stages) + f"{'total':>11}"
    )
    for m in dict.fromkeys(r['mode'] for r in rows):
        e = exponents(rows, m)
        if e: print(f"{m:<7}" + ''.join(f"{(f'{e[s]:8.2f}' if s in e else '-'):>11}" for s in stages + ['total']))
    print()
    by = {(r['n'], r['mode']): r for r in rows}
    for n in sorted({r['n'] for r in rows}):
        if (n, 'plain') in by and (n, 'memory') in by:
            p, m = by[n, 'plain'], by[n, 'memory']
            same = ['qc', 'normalise', 'hvg', 'pca', 'neighbours', 'leiden', 'markers']
            print(
                f"{n:>9,} cells: total memory/plain = {m['total_s'] / p['total_s']:.3f} (memory includes kb "
                "annotation; "
                "QC->markers "
                f"{sum(m['seconds'].get(s, 0) for s in same) / sum(p['seconds'].get(s, 0) for s in same):.3f}), "
                f"peak RSS memory/plain = {m['peak_all_gib'] / p['peak_all_gib']:.3f}"
            )
        if (n, 'dask') in by and (n, 'memory') in by:
            d, m = by[n, 'dask'], by[n, 'memory']
            pre = ['read', 'qc', 'normalise', 'hvg', 'pca']
            print(
                f"{n:>9,} cells: read->PCA dask/memory = "
                f"{sum(d['seconds'].get(s, 0) for s in pre) / sum(m['seconds'].get(s, 0) for s in pre):.3f}, "
                "peak RSS dask/memory = "
                f"{max(d['peak_gib'].values()) / max(m['peak_gib'][s] for s in pre if s in m['peak_gib']):.3f} "
                "(read->PCA)"
            )
    for r in rows:
        if r.get('cells_per_s'):
            print(
                f"{r['n']:>9,} cells embedded at {r['cells_per_s']:.0f} cells/s, peak RSS while embedding "
                f"{r['peak_gib']['embed']:.2f} GiB"
            )
        if 'agreement' in r:
            g = r['agreement']
            used = (
                f"sampled ({g['n_cells_used']:,} cells drawn)"
                if 'n_cells_used' in g
                else 'capped per cluster (before 2026-11-23)'
            )
            print(
                f"{r['n']:>9,} cells, {r['n_clusters']} clusters: {used} vs full markers: top-10 overlap "
                f"{g['overlap']:.3f} "
                f"(min {g['overlap_min']:.2f}), top gene same {g['top1_same']:.3f}; kb label same in "
                f"{g['label_same_clusters']:.3f} of clusters, "
                f"{g['label_same_cells']:.3f} of cells; full markers took {g['full_markers_s']:.1f} s vs "
                f"{r['seconds'].get('markers', float('nan')):.1f} s sampled"
            )
            if 'seed_overlap' in g:
                print(
                    f"{'':>9}  noise floor, a second seed of the sample vs the first: top-10 overlap "
                    f"{g['seed_overlap']:.3f}; kb label same in "
                    f"{g['seed_label_same_clusters']:.3f} of clusters, {g['seed_label_same_cells']:.3f} of cells"
                )

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', nargs='+', type=int, default=[10**4, 10**5, 10**6])
    p.add_argument('--modes', nargs='+', default=['plain', 'memory'], choices=['plain', 'memory', 'dask', 'embed'])
    p.add_argument('--dask', action='store_true', help='add the dask mode')
    p.add_argument(
        '--plain-max',
        type=int,
        default=10**5,
        help='largest size run in plain mode (its dense scale needs cells x 2000 x 4 B more)',
    )
    p.add_argument(
        '--agreement-max', type=int, default=10**5, help='largest size with full-vs-sampled marker agreement'
    )
    p.add_argument('--workdir', default='/tmp/deepseq_scale')
    p.add_argument('--json', help='append each result as a JSON line to this file')
    p.add_argument(
        '--table',
        nargs='+',
        metavar='JSONL',
        help='print the tables of results saved with --json (several runs together) and exit',
    )
    p.add_argument('--child', nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child: return child(int(a.child[0]), a.child[1], a.child[2], a.child[3] == '1')
    if a.table:
        rows = [json.loads(l) for f in a.table for l in open(f) if l.strip()]
        return table(sorted(rows, key=lambda r: (r['n'], ['plain', 'memory', 'dask', 'embed'].index(r['mode']))))
    os.makedirs(a.workdir, exist_ok=True)
    modes = list(dict.fromkeys(a.modes + (['dask'] if a.dask else [])))
    rows = []
    for n in a.sizes:
        path = ensure_data(n, a.workdir)
        for m in modes:
            if m == 'plain' and n > a.plain_max: continue
            r = subprocess.run([sys.executable, __file__, '--child', str(n), m, path, str(int(n <= a.agreement_max))],
                               capture_output=True, text=True)
            res = [l for l in r.stdout.splitlines() if l.startswith('RESULT ')]
            if r.returncode or not res:
                print(f"{n:,} {m}: failed (exit {r.returncode})\n{r.stderr[-2000:]}", flush=True); continue
            rows.append(json.loads(res[-1][7:]))
            x = rows[-1]
            print(
                f"{n:>9,} {m:<7} {x['total_s']:8.1f} s  peak {x['peak_all_gib']:.2f} GiB  cells {x['n_cells']:,}  "
                f"clusters {x['n_clusters']}",
                flush=True,
            )
            if a.json:
                with open(a.json, 'a') as f: f.write(json.dumps(rows[-1]) + '\n')
    table(rows)

if __name__ == '__main__': main()
