"""Does `{key}_confidence` tell a user which cluster labels to check?

Every labelled bundled dataset goes through the settings' QC and clustering at each `--resolutions` value, at full depth
and with half of each cell's counts (`annotation_resolution.thinned`), then `annotate(backend='kb')`. Each cluster's
label is *true at its level* when most of its cells' true labels are its CL term or lie below it (a coarse label that
is right counts as right: the engine stops at the parent when the evidence does not separate the children). The script
prints, per dataset and pooled, the cell-weighted AUROC with which each score ranks true clusters above the others:

- `confidence`: the shipped `{key}_confidence` (the last descended step's score times its margin's share);
- `min_lead`: the smallest lead of the chosen candidate over its rival along the cluster's path
  (`uns[key]['evidence']`);
- `stable_depth`: the share of `--draws` readings, on the same clusters with half of each cell's counts, that give the
  same CL term;
- `stable_cells`: the same with half of each cluster's cells.

None of these was fitted to the labels: the table is a measurement of each, not a choice among them. No ground-truth
label reaches the annotator.

Usage: .venv/bin/python benchmarks/annotation_confidence.py [--resolutions 0.5,1,2] [--draws 3] [--datasets ...]
"""
import argparse, warnings
from pathlib import Path
import sys

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from deepseq_nb.annotate import annotate
from deepseq_nb.cell_ontology import is_under
from deepseq_nb.cluster import run_pipeline
from deepseq_nb.config import load_settings
from deepseq_nb.data import DATASETS, load
from deepseq_nb.ontology import to_cl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotation_resolution import on_clusters, thinned  # noqa: E402

SCORES = ['confidence', 'min_lead', 'stable_depth', 'stable_cells']


def read(a, S, tissue) -> pd.Series:
    "Each cluster's CL id from `annotate(backend='kb')`."
    annotate(a, backend='kb', tissue=tissue, key_added='e', settings=S)
    return a.obs.groupby('leiden', observed=True)['e_cl_id'].first()


def min_lead(ev: pd.DataFrame, cluster) -> float:
    "The smallest score lead of the chosen candidate over its rival along the cluster's path (0 without a path)."
    e = ev[ev.cluster.astype(str) == str(cluster)]
    chosen, rival = e[e.role == 'chosen'].set_index('at').score, e[e.role == 'rival'].set_index('at').score
    lead = chosen - rival.reindex(chosen.index).fillna(0)
    return float(lead.min()) if len(lead) else 0.0


def half_cells(a, seed):
    "Half of each of `a`'s clusters' cells (at least one)."
    rng = np.random.default_rng(seed)
    idx = [rng.choice(ix, max(1, len(ix) // 2), replace=False)
           for ix in a.obs.groupby('leiden', observed=True).indices.values()]
    return a[np.sort(np.concatenate(idx))].copy()


def clusters_of(name, res, depth, draws) -> list:
    "One row per cluster: cells, whether its label is true at its level, and the four scores."
    S = load_settings(overrides=[f'cluster.resolution={res}'])
    raw = load(name, x_is=S.get('data.x_is'))
    if depth < 1: raw = thinned(raw, depth, 0)
    a = run_pipeline(raw.copy(), S, umap=False)
    tissue = (a.uns.get('dataset') or {}).get('tissue')
    L = read(a, S, tissue)
    ev, conf = pd.DataFrame(a.uns['e']['evidence']), a.obs.groupby('leiden', observed=True)['e_confidence'].first()
    thin = [read(on_clusters(raw, a, 0.5, 10 + s), S, tissue) for s in range(draws)]
    half = [read(half_cells(a, s), S, tissue).reindex(L.index) for s in range(draws)]
    truth = {t: getattr(to_cl(t, tissue=tissue), 'id', None) for t in a.obs['cell_type'].astype(str).unique()}
    rows = []
    for c, o in a.obs.groupby('leiden', observed=True):
        lid = L[c]
        true = np.mean([isinstance(lid, str) and is_under(truth[t], lid) for t in o['cell_type'].astype(str)])
        rows.append(dict(dataset=name, resolution=res, depth=depth, cluster=c, n_cells=len(o), label=lid,
                         true_at_level=true >= 0.5, confidence=float(conf[c]), min_lead=min_lead(ev, c),
                         stable_depth=np.mean([t[c] == lid for t in thin]),
                         stable_cells=np.mean([h[c] == lid for h in half])))
    return rows


def auroc(g: pd.DataFrame, score: str) -> float:
    "Cell-weighted AUROC of `score` for clusters true at their level (nan when all or none are)."
    y = g.true_at_level.to_numpy()
    return float(roc_auc_score(y, g[score], sample_weight=g.n_cells)) if 0 < y.sum() < len(y) else np.nan


def main():
    labelled = [n for n, d in DATASETS.items() if d.get('label_key') == 'cell_type']
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--resolutions', default='0.5,1,2')
    p.add_argument('--draws', type=int, default=3)
    p.add_argument('--datasets', default=','.join(labelled))
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    rows = []
    for name in args.datasets.split(','):
        for res in map(float, args.resolutions.split(',')):
            for depth in (1.0, 0.5):
                rows += clusters_of(name, res, depth, args.draws)
            print(f'{name} at {res}: {sum(r["dataset"] == name for r in rows)} clusters so far', flush=True)
    d = pd.DataFrame(rows)
    out = [dict(dataset=k, clusters=len(g), true_share=float(np.average(g.true_at_level, weights=g.n_cells)),
                **{s: auroc(g, s) for s in SCORES}) for k, g in [('pooled', d), *d.groupby('dataset')]]
    print('\ncell-weighted AUROC of each score for clusters whose label is true at its level:')
    print(pd.DataFrame(out).round(3).to_string(index=False))


if __name__ == '__main__':
    main()
