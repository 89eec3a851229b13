"""Would the frozen scGPT space separate held-out types better if each cell were tokenised from its study's HVGs only?

scGPT's own tutorials subset a dataset to its highly variable genes before binning; `embed_reference` tokenises every
gene a study measured (a cell's top `max_len - 1` expressed genes). This script reruns the leave-one-type-out of
`fig_novelty_curves` (the settings' `[novelty]` subsample, calibration and clustering; the kb veto off, as it does not
touch the frozen score) with the frozen embedding made both ways, and prints the per-fold-mean AUROC of the frozen
space (and of the PCA space, which does not change) as mean ± sd over seeds. A study with no more measured genes in
the reference than `--n-hvg` is tokenised the same both ways (pancreas_xin keeps 980).

Usage: .venv/bin/python benchmarks/frozen_hvg.py [--seeds 0,1,2] [--datasets pbmc3k,pancreas_xin] [--n-hvg 2000]
"""
import argparse, time, warnings

import numpy as np
import pandas as pd
import scanpy as sc

from deepseq_nb.config import load_settings
from deepseq_nb.crosstissue import cross_tissue_reference, embed_reference
from deepseq_nb.encoder import embed
from deepseq_nb.novelty import novelty_settings
from deepseq_nb.novelty_experiments import leave_one_type_out
from deepseq_nb.pretrain import default_encoder


def hvg_embedding(ref, enc, n_hvg:int, key:str='X_scgpt'):
    "Replace each study's rows of `obsm[key]` by the embedding of its `n_hvg` Seurat HVGs (all genes if fewer)."
    E = pd.DataFrame(ref.obsm[key], index=ref.obs_names)
    for d in ref.obs.dataset.cat.categories:
        sub = ref[ref.obs.dataset == d]
        sub = sub[:, ref.var_names[ref.var[f'in_{d}'].values]].copy()
        if sub.n_vars > n_hvg:
            sc.pp.highly_variable_genes(sub, n_top_genes=n_hvg, flavor='seurat')
            sub = sub[:, sub.var.highly_variable.values].copy()
        embed(sub, enc, key_added=key, progress=False)
        E.loc[sub.obs_names] = sub.obsm[key]
    ref.obsm[key] = E.to_numpy(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--datasets', default='pbmc3k,pancreas_xin')
    p.add_argument('--n-hvg', type=int, default=2000)
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    P = novelty_settings(load_settings())
    enc = default_encoder(progress=False)
    common = dict(calib_frac=P['calib_frac'], k=P['k'], resolution=P['resolution'], adapter=P['adapter'], kb=False,
                  drop_top=P['drop_top'], false_novel_rate=P['false_novel_rate'], min_cells=P['min_cells'],
                  max_types=P['max_types'])
    rows, t0 = [], time.perf_counter()
    for seed in map(int, args.seeds.split(',')):
        ref = cross_tissue_reference(max_cells=P['max_cells'] or None, seed=seed)
        for variant in ('all measured genes', f'{args.n_hvg} HVGs'):
            if variant == 'all measured genes': embed_reference(ref, enc)
            else: hvg_embedding(ref, enc, args.n_hvg)
            for d in args.datasets.split(','):
                t = leave_one_type_out(ref, d, seed=seed, **common)['table']
                rows.append(dict(dataset=d, variant=variant, seed=seed, folds=len(t),
                                 auroc_frozen=t.auroc_frozen.mean(), auroc_pca=t.auroc_pca.mean()))
                print(f"seed {seed} {d} {variant}: frozen {rows[-1]['auroc_frozen']:.3f}, "
                      f"pca {rows[-1]['auroc_pca']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tab = pd.DataFrame(rows)
    agg = tab.groupby(['dataset', 'variant'], sort=False)[['auroc_frozen', 'auroc_pca']].agg(['mean', 'std']).round(3)
    print('\nper-fold-mean AUROC, mean and sd over seeds', args.seeds)
    print(agg.to_string())


if __name__ == '__main__':
    main()
