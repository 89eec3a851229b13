"""How much do the default kb labels depend on the Leiden resolution a user picks?

Every labelled bundled dataset goes through the settings' QC and clustering (as `paper_figures/tab_annotation_e2e`)
at each `--resolutions` value (`cluster.resolution`; 1.0 is the shipped setting and reproduces the table), then
`annotate(backend='kb')`, scored with `celltyping.score_annotation`. The engine's rules were chosen at resolution 1.0,
except the reference groups read at finer resolutions (`celltyping.COARSE`) and the group reading of their parts
(`celltyping.GROUP_READING`), both designed on pbmc3k at 2.0: every other dataset and resolution is a check nothing was
fitted to (`--coarse 0` reads cluster by cluster, as before them; `--group-reading 0` keeps every part's own reading).
Prints one row per dataset and resolution (median genes detected per cell, clusters, cell-weighted mean agreement,
exact, macro-F1, lineage) and the mean over datasets per resolution.

`--cells N` resamples each dataset to N cells first (counts: `scale.synthetic_counts`, each cell a binomial mix of two
cells of one label; log-normalised data: each gene's value taken from one of two cells of one label, so every gene
keeps its distribution within each label), so that the settings' clustering at 1.0 is much finer than the types:
the grain of a large sample. `--ref-cells` sets
`celltyping.REF_CELLS` (0: the reference partition on the whole graph, as before it); it was designed on pbmc3k
resampled to 20,000 and 100,000 cells (`benchmarks/annotation.py`).

`--fraction F --seeds N` keeps a random share F of each dataset's real cells instead (no synthesis), N draws each: a
smaller study of the same tissue. The settings' clustering of fewer cells is coarser, types merge into one cluster and
the populations the engine compares each cluster with change, so this asks whether a reading holds on a sample the rules
were not chosen on. The table then gives the mean and the spread (sd) over the draws. `--split 0` reads a cluster
whose descent stops between two lineages as one (`celltyping.SPLIT`, designed on pbmc3k halved: `--fraction 0.5`).
`--shared-lineage 0` lets every type inherit its lineage's evidence at every node (before `celltyping.SHARED_LINEAGE`).
`--no-tissue` annotates every dataset with no tissue given or recorded (the score still uses the true one): the
engine then reads the tissue from the clusters (`celltyping.tissue_from_reading`), as for most h5ad files.
`--homogeneous off|failed|all` sets `celltyping.HOMOGENEOUS` (which clusters at a node of one type plain detection
decides).
`--depth F` keeps a share F of each cell's counts (`scanpy.pp.downsample_counts`, without replacement): the same cells
sequenced shallower, the commonest difference between a user's run and the bundled ones. pbmc3k holds counts; the other
datasets hold log-normalised values whose counts are read back cell by cell (`counts_of`: each cell's smallest detected
value is one count, in the log base whose ratios are whole numbers; refused where neither is), thinned, and scaled back
to each cell's former total in the same log. `--same-clusters` reads the thinned expression on the full-depth clusters
(cluster once, at full depth): what the reading alone loses, apart from the coarser clustering of shallower cells.
`--ribosomal 0` leaves database records that name a ribosomal-protein or mitochondrial gene out of the kb index
(`knowledge.RIBOSOMAL_MARKERS`).

Usage: .venv/bin/python benchmarks/annotation_resolution.py [--resolutions 0.5,1,2,4] [--datasets ...] [--coarse 0]
       [--group-reading 0] [--cells 8000] [--ref-cells 0] [--fraction 0.5 --seeds 3] [--split 0]
       [--shared-lineage 0] [--homogeneous all] [--no-tissue] [--ribosomal 0] [--depth 0.5 [--same-clusters]]
"""
import argparse, warnings

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

import deepseq_nb.celltyping as ct
import deepseq_nb.knowledge as kn
from deepseq_nb.annotate import annotate
from deepseq_nb.celltyping import score_annotation
from deepseq_nb.cluster import normalize, run_pipeline
from deepseq_nb.config import load_settings
from deepseq_nb.data import DATASETS, load
from deepseq_nb.scale import synthetic_counts


def resampled(a: ad.AnnData, n: int, seed: int = 0) -> ad.AnnData:
    "`a` resampled to n cells: counts by `synthetic_counts`; log values gene by gene from one of two cells of a label."
    if a.uns.get('x_is') == 'counts': return synthetic_counts(n, base=a, seed=seed)
    rng = np.random.default_rng(seed)
    lab = a.obs['cell_type'].astype(str).to_numpy()
    first = rng.choice(a.n_obs, n)  # a cell, then a second cell of its label
    second = np.array([rng.choice(np.flatnonzero(lab == lab[i])) for i in first])
    X = sp.csr_matrix(a.X, dtype=np.float32)
    pick = rng.random((n, a.n_vars)) < 0.5  # each gene's value from the first or the second cell
    Y = sp.csr_matrix(np.where(pick, X[first].toarray(), X[second].toarray()))
    obs = a.obs.iloc[first].reset_index(drop=True)
    obs.index = [f'syn{i}' for i in range(n)]
    return ad.AnnData(Y, obs=obs, var=a.var.copy(), uns=dict(a.uns))


def subsampled(a: ad.AnnData, fraction: float, seed: int = 0) -> ad.AnnData:
    "A random share `fraction` of `a`'s cells (without replacement; order kept)."
    idx = np.random.default_rng(seed).choice(a.n_obs, int(round(fraction * a.n_obs)), replace=False)
    return a[np.sort(idx)].copy()


LOGS = {'ln': (np.expm1, np.log1p), 'log2': (lambda v: np.exp2(v) - 1, lambda v: np.log2(v + 1))}


def counts_of(a: ad.AnnData, probe: int = 200) -> tuple:
    "(counts, log): a log-normalised matrix's counts, each cell's smallest detected value one count; None if not so."
    X = sp.csr_matrix(a.X, dtype=np.float64)
    def whole(f, rows):  # mean distance of the cells' count ratios from whole numbers
        r = [f(X.data[X.indptr[i]:X.indptr[i + 1]]) for i in rows if X.indptr[i + 1] > X.indptr[i]]
        return float(np.mean([np.abs(v / v.min() - np.round(v / v.min())).mean() for v in r]))
    rows = range(min(probe, a.n_obs))
    log = min(LOGS, key=lambda k: whole(LOGS[k][0], rows))
    if whole(LOGS[log][0], rows) > 0.05: return None, None  # no base gives whole-number ratios: not counts, scaled
    C = X.copy()
    for i in range(C.shape[0]):
        v = LOGS[log][0](C.data[C.indptr[i]:C.indptr[i + 1]])
        C.data[C.indptr[i]:C.indptr[i + 1]] = np.round(v / v.min()) if len(v) else v
    return C, log


def thinned(a: ad.AnnData, depth: float, seed: int = 0) -> ad.AnnData:
    "`a` with a share `depth` of each cell's counts kept (log-normalised: counts thinned, then rescaled and logged)."
    b = a.copy()
    if a.uns.get('x_is') == 'counts':
        C, log = sp.csr_matrix(b.X), None
    else:
        C, log = counts_of(b)
        if C is None: raise SystemExit(f"{a.uns.get('dataset', {}).get('name')}: its values are no log of counts")
    tot = np.asarray(C.sum(1)).ravel()
    c = ad.AnnData(sp.csr_matrix(C, dtype=np.float32))
    sc.pp.downsample_counts(c, counts_per_cell=np.floor(depth * tot).astype(int), random_state=seed)
    if log is None: b.X = c.X; return b
    X = sp.csr_matrix(a.X, dtype=np.float64)
    X.data = LOGS[log][0](X.data)
    before = np.asarray(X.sum(1)).ravel()  # each cell's former total
    after = np.maximum(np.asarray(c.X.sum(1)).ravel(), 1)
    Y = sp.csr_matrix(sp.diags(before / after) @ sp.csr_matrix(c.X, dtype=np.float64))
    Y.data = LOGS[log][1](Y.data)
    b.X = Y.astype(np.float32)
    return b


def on_clusters(raw: ad.AnnData, full: ad.AnnData, depth: float, seed: int = 0) -> ad.AnnData:
    "`raw`'s cells of `full` with a share `depth` of their counts, log-normalised, on `full`'s clusters and graph."
    a = thinned(raw[full.obs_names], depth, seed)
    normalize(a)
    a.obs['leiden'], a.obsm['X_pca'], a.obsp = full.obs['leiden'].values, full.obsm['X_pca'], dict(full.obsp)
    a.uns['neighbors'] = full.uns['neighbors']
    return a


def main():
    labelled = [n for n, d in DATASETS.items() if d.get('label_key') == 'cell_type']
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--resolutions', default='0.5,1,2,4')
    p.add_argument('--datasets', default=','.join(labelled))
    p.add_argument('--coarse', type=float, default=ct.COARSE, help='celltyping.COARSE (0: each cluster its own group)')
    p.add_argument('--group-reading', type=int, default=int(ct.GROUP_READING), help='celltyping.GROUP_READING (0: off)')
    p.add_argument('--cells', type=int, default=0, help='resample each dataset to this many cells (0: as bundled)')
    p.add_argument('--ref-cells', type=int, default=ct.REF_CELLS, help='celltyping.REF_CELLS (0: off)')
    p.add_argument('--split', type=int, default=int(ct.SPLIT), help='celltyping.SPLIT (0: off)')
    p.add_argument('--shared-lineage', type=int, default=int(ct.SHARED_LINEAGE),
                   help='celltyping.SHARED_LINEAGE (0: every type inherits its lineage at every node)')
    p.add_argument('--homogeneous', default=ct.HOMOGENEOUS, choices=['off', 'failed', 'all'],
                   help='celltyping.HOMOGENEOUS (which clusters of a one-type node plain detection decides)')
    p.add_argument('--ribosomal', type=int, default=int(kn.RIBOSOMAL_MARKERS),
                   help='knowledge.RIBOSOMAL_MARKERS (0: records naming ribosomal/mitochondrial genes not indexed)')
    p.add_argument('--no-tissue', action='store_true',
                   help='annotate with no tissue given or recorded (scored under the true one)')
    p.add_argument('--fraction', type=float, default=1.0, help="keep this share of each dataset's cells (1: all)")
    p.add_argument('--depth', type=float, default=1.0, help="keep this share of each cell's counts (1: all)")
    p.add_argument('--same-clusters', action='store_true', help='with --depth: read on the full-depth clusters')
    p.add_argument('--seeds', type=int, default=1,
                   help='draws per dataset and resolution with --fraction, --cells or --depth')
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    ct.COARSE, ct.GROUP_READING, ct.REF_CELLS = args.coarse, bool(args.group_reading), args.ref_cells
    ct.SPLIT, ct.SHARED_LINEAGE, ct.HOMOGENEOUS = bool(args.split), bool(args.shared_lineage), args.homogeneous
    kn.RIBOSOMAL_MARKERS = bool(args.ribosomal)
    rows = []
    for name in args.datasets.split(','):
        for res in map(float, args.resolutions.split(',')):
            for seed in range(args.seeds):
                S = load_settings(overrides=[f'cluster.resolution={res}'])
                a = load(name, x_is=S.get('data.x_is'))
                if args.cells: a = resampled(a, args.cells, seed)
                if args.fraction < 1: a = subsampled(a, args.fraction, seed)
                same = args.depth < 1 and args.same_clusters
                if same: a = on_clusters(a, run_pipeline(a, S, umap=False), args.depth, seed)
                elif args.depth < 1: a = thinned(a, args.depth, seed)
                genes = float(np.median(np.diff(sp.csr_matrix(a.X > 0).indptr)))  # normalising keeps what is detected
                if not same: a = run_pipeline(a, S, umap=False)
                tissue = (a.uns.get('dataset') or {}).get('tissue')
                if args.no_tissue: a = ct.without_tissue(a)
                annotate(a, backend='kb', tissue=None if args.no_tissue else tissue, key_added='e', settings=S)
                s = score_annotation(a.obs['cell_type'], a.obs['e_label'].astype(str), tissue)
                rows.append(dict(dataset=name, resolution=res, seed=seed, genes=genes,
                                 clusters=a.obs['leiden'].nunique(), **s))
                print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False, header=len(rows) == 1), flush=True)
    tab = pd.DataFrame(rows)
    cols = ['mean_agreement', 'exact', 'macro_f1', 'lineage']
    if args.seeds > 1:
        print('\nper dataset, mean and sd over the draws:')
        print(tab.groupby(['dataset', 'resolution'])[cols[:2]].agg(['mean', 'std']).round(3).to_string())
    print('\nmean over datasets, per resolution' + (' (and over the draws)' if args.seeds > 1 else '') + ':')
    print(tab.groupby('resolution')[['clusters', *cols]].mean().round(3).to_string())


if __name__ == '__main__':
    main()
