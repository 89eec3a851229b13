"""Longer pretraining of the small encoder, and what it does downstream: the frozen space's memory-kNN macro-F1.

Usage: python benchmarks/encoder_epochs.py [--epochs 3 8] [--seeds 0 1 2] [--cache /tmp/encoders]

For each number of epochs: the small encoder with the settings.ini [encoder] parameters and that many epochs
(loaded from `--cache`, else pretrained there once: about 4 CPU-minutes per 3 epochs on this machine), its validation
loss per epoch
(GEP + GEPC on held-out cells, the per-gene mean-bin baseline beside GEP), then the cross-tissue reference embedded once
and the memory kNN (k = 15) scored on each seed's test split: macro-F1 mean ± sd over the seeds, per tissue and overall.
The epochs equal to settings.ini's come from the default cache (the encoder the figures use).
"""
import argparse, os, time
os.environ.setdefault('OMP_NUM_THREADS', '1')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--epochs', type=int, nargs='+', default=[3, 8])
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--cache', default='/tmp/deepseq_encoders')
    a = ap.parse_args(argv)
    import torch; torch.set_num_threads(1)
    import pandas as pd
    import deepseq_nb.crosstissue as ct
    import deepseq_nb.crosstissue_run as ctr
    from deepseq_nb.config import load_settings
    from deepseq_nb.pretrain import encoder_settings, pretrained_encoder, default_encoder, PRETRAIN_KEYS
    s = encoder_settings(load_settings())
    p = {k: s[k] for k in PRETRAIN_KEYS if s.get(k, '') != ''}
    ref, rows = ct.cross_tissue_reference(), []
    for ep in a.epochs:
        t0 = time.perf_counter()
        enc = (
            default_encoder()
            if ep == int(p['epochs'])
            else pretrained_encoder(a.cache, progress=False, **(p | dict(epochs=ep, n_threads=1)))
        )
        log = enc.info['pretrain']
        print(f"epochs={ep}: ready in {time.perf_counter() - t0:.0f} s (pretraining took {log['seconds']} s)")
        print(pd.DataFrame(log['val']).to_string(index=False))
        r = ref.copy(); ct.embed_reference(r, enc)
        for seed in a.seeds:
            ctr._resplit(r, 0.3, seed)
            t = ct.score_methods(r, {'knn': ct.memory_knn(r, k=15)[0]})
            rows += [dict(epochs=ep, seed=seed, tissue=x.tissue, macro_f1=x.macro_f1) for x in t.itertuples()]
    df = pd.DataFrame(rows)
    print(df.groupby(['epochs', 'tissue']).macro_f1.agg(['mean', 'std', 'count']).round(3).to_string())


if __name__ == '__main__':
    main()
