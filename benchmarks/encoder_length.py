"""Longer cells or longer pretraining for the small encoder: do `[encoder] max_len` / `epochs` pay for novelty?

`--drop-top` also varies `[novelty] drop_top`, the top principal directions removed from the frozen space.

For each `--lengths` value (tokens per cell), `--epochs` value (empty: the settings') and seed: the small encoder
pretrained with the settings.ini `[encoder]` parameters but that length, number of epochs and seed (cached like every
small encoder; seed s is the encoder the figures use for seed s when length and epochs are the settings' own), the
cross-tissue reference embedded with it, and the leave-one-type-out of `fig_novelty_curves` on the `[novelty]` studies
(the settings' subsample, calibration and clustering; the kb veto off, as it does not touch the frozen score). Prints
the pooled AUROC of the frozen space, and of the PCA space, which no encoder touches, as mean ± sd over the seeds,
with the pretraining time. At the settings' length the rows reproduce the figure's `frozen` and `pca` pooled AUROCs.

Usage: .venv/bin/python benchmarks/encoder_length.py [--lengths 64,128,256] [--epochs 3,8] [--drop-top 0,1,2]
       [--seeds 0,1,2]
"""
import argparse, warnings

import pandas as pd
from sklearn.metrics import roc_auc_score

from deepseq_nb.config import load_settings
from deepseq_nb.crosstissue import cross_tissue_reference, embed_reference
from deepseq_nb.novelty import novelty_settings
from deepseq_nb.novelty_experiments import leave_one_type_out
from deepseq_nb.pretrain import default_encoder


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--lengths', default='64,128,256')
    p.add_argument('--epochs', default='', help="pretraining epochs, comma-separated (default: the settings')")
    p.add_argument('--drop-top', default='',
                   help="top directions removed from the frozen space, comma-separated (default: the settings')")
    p.add_argument('--seeds', default='0,1,2')
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    rows = []
    epochs = [int(e) for e in args.epochs.split(',') if e] or [None]
    drops = [int(d) for d in args.drop_top.split(',') if d] or [None]
    for L, E in [(L, E) for L in map(int, args.lengths.split(',')) for E in epochs]:
        S = load_settings(overrides={'encoder.max_len': L} | ({'encoder.epochs': E} if E else {}))
        P = novelty_settings(S)
        common = dict(calib_frac=P['calib_frac'], k=P['k'], resolution=P['resolution'], adapter=P['adapter'], kb=False,
                      false_novel_rate=P['false_novel_rate'], min_cells=P['min_cells'], max_types=P['max_types'])
        for seed in map(int, args.seeds.split(',')):
            enc = default_encoder(S, seed=seed, progress=False)
            ref = cross_tissue_reference(max_cells=P['max_cells'] or None, seed=seed)
            embed_reference(ref, enc)
            for d, D in [(d, D if D is not None else P['drop_top']) for d in P['datasets'] for D in drops]:
                c = leave_one_type_out(ref, d, seed=seed, progress=False, drop_top=D, **common)['cells']
                rows.append(dict(max_len=L, epochs=int(S.get('encoder.epochs')), drop_top=D, dataset=d, seed=seed,
                                 frozen=roc_auc_score(c.is_new, c.frozen), pca=roc_auc_score(c.is_new, c.pca),
                                 pretrain_s=enc.info['pretrain']['seconds']))
                print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False, header=len(rows) == 1), flush=True)
    tab = pd.DataFrame(rows)
    print('\npooled leave-one-type-out AUROC, mean and sd over seeds', args.seeds, '(pretrain_s: mean seconds)')
    by = ['dataset', 'max_len', 'epochs', 'drop_top']
    agg = tab.groupby(by)[['frozen', 'pca']].agg(['mean', 'std']).round(3)
    agg[('pretrain_s', 'mean')] = tab.groupby(by).pretrain_s.mean().round(0)
    print(agg.to_string())


if __name__ == '__main__':
    main()
