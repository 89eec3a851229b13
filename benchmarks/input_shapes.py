"""What does the kb engine make of pbmc3k in the shapes a user's AnnData comes in?

The engine counts how many of a cluster's cells detect each gene. A scanpy analysis often leaves X cut to the highly
variable genes, and scaled, with every gene kept in `.raw`. This script reads pbmc3k in those shapes, on the clusters
of the whole matrix (the settings' pipeline), so only the matrix read changes:

1. the whole matrix (what `paper_figures/tab_annotation_e2e` scores);
2. X cut to the N highly variable genes (seurat flavour on the log-normalised counts), `.raw` kept: `annotate` reads
   `.raw` (`use_raw=None`, scanpy's convention);
3. the same X read alone (`use_raw=False`, as a user without `.raw` has it): the lineage markers the HVGs leave out
   are gone.

Cell-weighted mean agreement, exact accuracy and lineage accuracy under the tissue PBMC. pbmc3k is a design dataset of
the engine, so every row is in-sample for its rules; the rows differ only in the genes read.

Usage: .venv/bin/python benchmarks/input_shapes.py [--n-top 3000,2000,1000]
"""
import argparse, warnings

import pandas as pd
import scanpy as sc

from deepseq_nb.annotate import annotate
from deepseq_nb.celltyping import score_annotation
from deepseq_nb.cluster import run_pipeline
from deepseq_nb.config import load_settings
from deepseq_nb.data import load

MARKERS = ('CD3D', 'CD3E', 'PTPRC', 'CCR7', 'CD4', 'CD8A', 'MS4A1', 'NKG7', 'CD14', 'FCGR3A')


def hvgs(n: int, S) -> pd.Index:
    "The n most variable genes of pbmc3k's log-normalised counts (seurat flavour)."
    b = load('pbmc3k', x_is=S.get('data.x_is'))
    sc.pp.normalize_total(b); sc.pp.log1p(b)
    sc.pp.highly_variable_genes(b, n_top_genes=n, flavor='seurat')
    return b.var_names[b.var['highly_variable'].to_numpy()]


def score(a, use_raw) -> dict:
    "The default kb annotation of `a`'s clusters, scored against pbmc3k's labels."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the panel warning: this script measures what it warns of
        b = annotate(a, backend='kb', tissue='PBMC', use_raw=use_raw, key_added='s', copy=True)
    s = score_annotation(a.obs['cell_type'], b.obs['s_label'].astype(str), 'PBMC')
    return {k: round(v, 3) for k, v in s.items() if k != 'n_cells'}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n-top', default='3000,2000,1000', help='HVG counts to cut X to (comma-separated)')
    args = p.parse_args()
    S = load_settings()
    full = run_pipeline(load('pbmc3k', x_is=S.get('data.x_is')), S, umap=False)
    rows = [dict(matrix='whole matrix', genes_read=full.n_vars, **score(full, False))]
    for n in [int(x) for x in args.n_top.split(',')]:
        keep = full.var_names.isin(hvgs(n, S))
        cut = full.copy(); cut.raw = cut; cut = cut[:, keep].copy()
        gone = [g for g in MARKERS if g not in cut.var_names]
        rows.append(dict(matrix=f'X cut to {n} HVGs, .raw kept', genes_read=cut.raw.n_vars, **score(cut, None)))
        rows.append(dict(matrix=f'X cut to {n} HVGs, X alone', genes_read=cut.n_vars, **score(cut, False),
                         markers_missing=', '.join(gone)))
    print(pd.DataFrame(rows).fillna('').to_string(index=False))


if __name__ == '__main__':
    main()
