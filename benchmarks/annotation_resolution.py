"""How much do the default kb labels depend on the Leiden resolution a user picks?

Every labelled bundled dataset goes through the settings' QC and clustering (as `paper_figures/tab_annotation_e2e`)
at each `--resolutions` value (`cluster.resolution`; 1.0 is the shipped setting and reproduces the table), then
`annotate(backend='kb')`, scored with `celltyping.score_annotation`. The engine's rules were chosen at resolution 1.0,
except the reference groups read at finer resolutions (`celltyping.COARSE`) and the group reading of their parts
(`celltyping.GROUP_READING`), both designed on pbmc3k at 2.0: every other dataset and resolution is a check nothing was
fitted to (`--coarse 0` reads cluster by cluster, as before them; `--group-reading 0` keeps every part's own reading).
Prints one row per dataset and resolution (clusters, cell-weighted mean agreement, exact, macro-F1, lineage) and the
mean over datasets per resolution.

Usage: .venv/bin/python benchmarks/annotation_resolution.py [--resolutions 0.5,1,2,4] [--datasets ...] [--coarse 0]
       [--group-reading 0]
"""
import argparse, warnings

import pandas as pd

import deepseq_nb.celltyping as ct
from deepseq_nb.annotate import annotate
from deepseq_nb.celltyping import score_annotation
from deepseq_nb.cluster import run_pipeline
from deepseq_nb.config import load_settings
from deepseq_nb.data import DATASETS, load


def main():
    labelled = [n for n, d in DATASETS.items() if d.get('label_key') == 'cell_type']
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--resolutions', default='0.5,1,2,4')
    p.add_argument('--datasets', default=','.join(labelled))
    p.add_argument('--coarse', type=float, default=ct.COARSE, help='celltyping.COARSE (0: each cluster its own group)')
    p.add_argument('--group-reading', type=int, default=int(ct.GROUP_READING), help='celltyping.GROUP_READING (0: off)')
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    ct.COARSE, ct.GROUP_READING = args.coarse, bool(args.group_reading)
    rows = []
    for name in args.datasets.split(','):
        for res in map(float, args.resolutions.split(',')):
            S = load_settings(overrides=[f'cluster.resolution={res}'])
            a = run_pipeline(load(name, x_is=S.get('data.x_is')), S, umap=False)
            tissue = (a.uns.get('dataset') or {}).get('tissue')
            annotate(a, backend='kb', tissue=tissue, key_added='e', settings=S)
            s = score_annotation(a.obs['cell_type'], a.obs['e_label'].astype(str), tissue)
            rows.append(dict(dataset=name, resolution=res, clusters=a.obs['leiden'].nunique(), **s))
            print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False, header=len(rows) == 1), flush=True)
    tab = pd.DataFrame(rows)
    print('\nmean over datasets, per resolution:')
    cols = ['mean_agreement', 'exact', 'macro_f1', 'lineage']
    print(tab.groupby('resolution')[['clusters', *cols]].mean().round(3).to_string())


if __name__ == '__main__':
    main()
