"""Plugin settings on validation cells: the blood LoRA plugin of the cross-tissue experiment under a few settings.

Usage: python benchmarks/plugin_tuning.py [--seeds 0 1 2] [--tissues blood pancreas] [--max-cells 600]
                                           [--configs default stop_f1 ...]

For each seed, splits the cross-tissue reference as `run_cross_tissue` does, carves the validation share out of each
tissue's training cells (`crosstissue.validation_mask`), trains that tissue's plugin on at most `--max-cells` of the
remaining training cells (`crosstissue_run._plugin_view`) with each configuration (the [plugins] settings with one
change), and prints its macro-F1 on the validation cells, the epoch kept, the epochs run and the seconds. The test cells
are never read. Then, per tissue, the mean and spread over the seeds, and a leave-one-tissue-out choice: the
configuration best on the other tissues' validation cells, scored on this tissue's (out-of-sample), beside the best on
this tissue's own (in-sample). [crosstissue] plugin_epochs / plugin_val_fraction were chosen on blood, seed 0; the
[plugins] defaults on both tissues, seeds 0-2 (settings.ini says which numbers).
"""
import argparse, os, time
os.environ.setdefault('OMP_NUM_THREADS', '1')

CONFIGS = {
    'default': {},
    'early_stop_loss': dict(val_fraction=0.15),  # the [plugins] default until 2026-12-07
    'unbalanced': dict(balance=False),
    'lr1e-3': dict(lr=1e-3),
    'no_early_stop': dict(val_fraction=0.0),
    'attn_r16': dict(targets=['linear1', 'linear2', 'self_attn'], lora_r=16, lora_alpha=32),
    'stop_f1': dict(stop_on='val_macro_f1'),
    'best_f1_40': dict(stop_on='val_macro_f1', patience=40),  # every epoch run, the best validation macro-F1 kept
    'no_early_stop_20': dict(val_fraction=0.0, epochs=20),
    'no_early_stop_25': dict(val_fraction=0.0, epochs=25),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seeds', type=int, nargs='*', default=[0])
    ap.add_argument('--max-cells', type=int, default=600)
    ap.add_argument('--tissues', nargs='*', default=['blood'])
    ap.add_argument('--configs', nargs='*', default=list(CONFIGS), choices=list(CONFIGS))
    a = ap.parse_args(argv)
    import torch; torch.set_num_threads(1)
    import pandas as pd
    import deepseq_nb.crosstissue as ct
    import deepseq_nb.crosstissue_run as ctr
    from deepseq_nb.pretrain import default_encoder
    from deepseq_nb.plugins import plugin_settings, plugin_kwargs, train_plugin, plugin_outputs
    enc, ref, PP = default_encoder(), ct.cross_tissue_reference(), plugin_settings()
    share = ctr.ct_settings()['val_fraction']  # the cross-tissue experiment's validation cells
    rows = []
    for seed in a.seeds:
        ctr._resplit(ref, 0.3, seed)
        val = ct.validation_mask(ref, share, seed)
        view = ctr._plugin_view(ref, val, a.max_cells, seed)
        for tissue in a.tissues:
            mine = (ref.obs.tissue == tissue).to_numpy()
            tr, vv = view[(view.obs.split == 'train').to_numpy() & mine].copy(), ref[val & mine].copy()
            for name in a.configs:
                over = CONFIGS[name]
                kw, _ = plugin_kwargs(dict(PP, **over, seed=seed))
                if 'stop_on' in over: kw['stop_on'] = over['stop_on']
                t0 = time.perf_counter()
                ps = train_plugin(tr, enc, tissue=tissue, label_key='label', **kw)
                o = plugin_outputs(ps, vv, tissue)
                rows.append(
                    dict(
                        tissue=tissue,
                        seed=seed,
                        config=name,
                        n_train=tr.n_obs,
                        n_val=vv.n_obs,
                        val_macro_f1=round(ct._macro_f1(vv.obs.label.astype(str).to_numpy(), o.label.astype(str)), 3),
                        best_epoch=ps.info[tissue]['best']['epoch'],
                        epochs_run=len(ps.info[tissue]['log']),
                        seconds=round(time.perf_counter() - t0, 1),
                    )
                )
                print(rows[-1], flush=True)
    d = pd.DataFrame(rows)
    print(d.to_string(index=False))
    g = d.groupby(['tissue', 'config']).agg(f1_mean=('val_macro_f1', 'mean'), f1_sd=('val_macro_f1', 'std'),
                                            epochs=('epochs_run', 'mean'), seconds=('seconds', 'mean'))
    print(g.round(3).to_string())
    if len(a.tissues) > 1:  # choose on the other tissues, score on this one
        m = g.f1_mean.unstack('tissue')
        for t in a.tissues:
            pick = m.drop(columns=t).mean(1).idxmax()
            print(f'{t}: chosen on the other tissues {pick!r} -> {m.at[pick, t]:.3f} (out-of-sample); '
                  f'best on {t} itself {m[t].idxmax()!r} -> {m[t].max():.3f} (in-sample)')


if __name__ == '__main__':
    main()
