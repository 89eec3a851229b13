"""Does an LLM label clusters better when its prompt carries the expression evidence? `annotate(..., evidence=True)`.

On every labelled bundled dataset (the settings' QC and clustering, as `paper_figures/tab_annotation_e2e`), one LLM
backend labels each cluster from its top `--n-genes` markers, once with the published prompt and once with each
cluster's `expression_evidence` line added; both are scored against the dataset's labels with
`celltyping.score_annotation` (cell-weighted mean agreement, exact share, macro-F1, lineage level). Labels are read
only to score. Nothing of the evidence line (its genes, their number, its wording) was chosen on these scores, so
every row is out-of-sample for the option. Answers go to the user's answer cache as they arrive: a rerun asks
nothing. Usage (the local model needs `make local-llm` first):

    .venv/bin/python benchmarks/llm_evidence.py [--backend llamacpp:gemma-3-270m] [--datasets pbmc3k,pancreas_xin]
"""
import argparse, time, warnings

import pandas as pd

from deepseq_nb.annotate import annotate
from deepseq_nb.celltyping import score_annotation
from deepseq_nb.cluster import run_pipeline
from deepseq_nb.config import load_settings
from deepseq_nb.data import DATASETS, load


def labelled()->list[str]:
    "The bundled datasets with a `cell_type` ground truth."
    return [n for n, d in DATASETS.items() if d.get('label_key') == 'cell_type']


def run(name:str, backend:str, n_genes:int, S)->list[dict]:
    "One dataset: the backend without and with evidence, scored."
    a = run_pipeline(load(name, x_is=S.get('data.x_is')), S, umap=False)
    tissue = (a.uns.get('dataset') or {}).get('tissue')
    rows = []
    for ev in (False, True):
        t0 = time.perf_counter()
        annotate(a, backend=backend, tissue=tissue, n_genes=n_genes, evidence=ev, key_added='b', progress=False)
        st = a.uns['b']['stats']
        rows.append(dict(dataset=name, evidence=ev, clusters=a.obs['leiden'].nunique(), requests=st['calls'],
                         cache_hits=st['cache_hits'], seconds=round(time.perf_counter() - t0, 1),
                         **score_annotation(a.obs['cell_type'], a.obs['b_label'].astype(str), tissue)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backend', default='llamacpp:gemma-3-270m', help='LLM backend spec (not kb)')
    p.add_argument('--datasets', default=','.join(labelled()), help='comma-separated bundled dataset names')
    p.add_argument('--n-genes', type=int, default=10, help='top markers per cluster in the prompt')
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    S = load_settings()
    rows = [r for n in args.datasets.split(',') for r in run(n.strip(), args.backend, args.n_genes, S)]
    tab = pd.DataFrame(rows)
    cols = ['mean_agreement', 'exact', 'macro_f1', 'lineage']
    pd.set_option('display.width', 200)
    print(f'backend {args.backend}, top {args.n_genes} markers per cluster; evidence=True adds the Detected: line\n')
    show = ['dataset', 'evidence', 'clusters', 'requests', 'cache_hits', 'seconds', *cols]
    print(tab[show].round(3).to_string(index=False))
    print('\nmean over datasets:')
    print(tab.groupby('evidence')[cols].mean().round(3).to_string())


if __name__ == '__main__':
    main()
