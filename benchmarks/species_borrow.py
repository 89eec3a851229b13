"""What do borrowed types (`knowledge.BORROW_SPECIES`) do to the kb's labels, read as each species?

The mouse marker tables lack whole types (no mouse naive or memory CD4 T cell); `knowledge.with_borrowed` gives a
species the other species' records of every CL type it has none of. This script measures that switch off and on:

1. The expression engine (`annotate(backend='kb')`) on every labelled bundled dataset after the settings' QC and
   clustering (as `paper_figures/tab_annotation_e2e`), read once as its own species and once as the other one
   (human counts read with the mouse tables stand in for the mouse blood data the bundle lacks; the testis cells read
   as human are the reverse). Cell-weighted mean agreement, exact accuracy and lineage accuracy under the true tissue.
2. The marker-list kb (`annotate_marker_table`) on the GPTCelltype development split, mean agreement per source: the
   64 MCA rows are real mouse marker lists read with the mouse tables, the other sources human ones.

The switch was designed on the first part's human counts read as mouse; the testis cells, the MCA rows and every
human row are checks (the human rows move only through the BM25 statistics of the larger corpus).

Usage: .venv/bin/python benchmarks/species_borrow.py [--datasets pbmc3k,...] [--no-markers]
"""
import argparse, warnings

import pandas as pd

import deepseq_nb.knowledge as kn
from deepseq_nb.annotate import annotate
from deepseq_nb.celltyping import infer_species, knobs, score_annotation
from deepseq_nb.cli import annotate_marker_table
from deepseq_nb.cluster import run_pipeline
from deepseq_nb.config import load_settings
from deepseq_nb.data import DATASETS, data_dir, load
from deepseq_nb.evaluate import score_benchmark

OTHER = {'human': 'mouse', 'mouse': 'human'}


def expression_rows(names: list, S) -> list:
    "Engine scores per dataset, species read (own, other) and switch (off, on)."
    rows = []
    for name in names:
        a = run_pipeline(load(name, x_is=S.get('data.x_is')), S, umap=False)
        tissue, own = (a.uns.get('dataset') or {}).get('tissue'), infer_species(a)
        for read in (own, OTHER[own]):
            for on in (False, True):
                with knobs(kn, BORROW_SPECIES=on):
                    b = annotate(a, backend='kb', tissue=tissue, species=read, key_added='e', settings=S, copy=True)
                s = score_annotation(a.obs['cell_type'], b.obs['e_label'].astype(str), tissue)
                rows.append(dict(dataset=name, read_as=read, which='own' if read == own else 'other', borrow=on,
                                 **{k: s[k] for k in ('mean_agreement', 'exact', 'lineage')}))
                print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False, header=len(rows) == 1), flush=True)
    return rows


def marker_rows(S) -> pd.DataFrame:
    "Marker-list kb mean agreement per GPTCelltype dev source, switch off and on."
    dev = pd.read_csv(data_dir()/'benchmarks/gptcelltype_dev.csv')
    dev['species'] = dev['dataset'].map(lambda d: 'mouse' if d == 'MCA' else 'human')
    out = {}
    for on in (False, True):
        with knobs(kn, BORROW_SPECIES=on):
            pred = annotate_marker_table(dev, backend='kb', settings=S)
        r = score_benchmark(dev.assign(prediction=pred['prediction']), 'prediction')
        out[f'borrow={on}'] = r.rows.groupby('dataset')['score'].mean().to_dict() | {'ALL': r.mean}
    tab = pd.DataFrame(out)
    tab['n'] = dev.groupby('dataset').size().reindex(tab.index).fillna(len(dev)).astype(int)
    return tab


def main():
    labelled = [n for n, d in DATASETS.items() if d.get('label_key') == 'cell_type']
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--datasets', default=','.join(labelled))
    p.add_argument('--no-markers', action='store_true', help='skip the GPTCelltype marker lists')
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    S = load_settings()
    tab = pd.DataFrame(expression_rows(args.datasets.split(','), S))
    print('\nmean agreement, off -> on:')
    print(tab.pivot_table(index=['dataset', 'which', 'read_as'], columns='borrow', values='mean_agreement').round(3)
          .to_string())
    if not args.no_markers:
        print('\nGPTCelltype dev marker lists, mean agreement per source:')
        print(marker_rows(S).round(3).to_string())


if __name__ == '__main__':
    main()
