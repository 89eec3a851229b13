"""Plugin settings on validation cells: the blood LoRA plugin of the cross-tissue experiment under a few settings.

Usage: python benchmarks/plugin_tuning.py [--seed 0] [--max-cells 600] [--configs default stop_f1 ...]

Splits the cross-tissue reference with `--seed` as `run_cross_tissue` does, carves the validation share out of the blood
training cells (`crosstissue.validation_mask`), trains the blood plugin on at most `--max-cells` of the remaining
training cells (`crosstissue_run._plugin_view`) with each configuration (the [plugins] settings with one change), and
prints its macro-F1 on the validation cells, the epoch kept, the epochs run and the seconds. The test cells are never
read. This is how [crosstissue] plugin_stop_on was chosen (seed 0).
"""
import argparse, os, time
os.environ.setdefault('OMP_NUM_THREADS', '1')

CONFIGS = {
    'default': {},
    'unbalanced': dict(balance=False),
    'lr1e-3': dict(lr=1e-3),
    'no_early_stop': dict(val_fraction=0.0),
    'attn_r16': dict(targets=['linear1', 'linear2', 'self_attn'], lora_r=16, lora_alpha=32),
    'stop_f1': dict(stop_on='val_macro_f1'),
    'no_early_stop_20': dict(val_fraction=0.0, epochs=20),
    'no_early_stop_25': dict(val_fraction=0.0, epochs=25),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--max-cells', type=int, default=600)
    ap.add_argument('--tissue', default='blood')
    ap.add_argument('--configs', nargs='*', default=list(CONFIGS), choices=list(CONFIGS))
    a = ap.parse_args(argv)
    import torch; torch.set_num_threads(1)
    import pandas as pd
    import deepseq_nb.crosstissue as ct
    import deepseq_nb.crosstissue_run as ctr
    from deepseq_nb.pretrain import default_encoder
    from deepseq_nb.plugins import plugin_settings, plugin_kwargs, train_plugin, plugin_outputs
    enc, ref, PP = default_encoder(), ct.cross_tissue_reference(), plugin_settings()
    ctr._resplit(ref, 0.3, a.seed)
    val = ct.validation_mask(ref, PP['val_fraction'], a.seed)
    view = ctr._plugin_view(ref, val, a.max_cells, a.seed)
    mine = (ref.obs.tissue == a.tissue).to_numpy()
    tr, vv = view[(view.obs.split == 'train').to_numpy() & mine].copy(), ref[val & mine].copy()
    rows = []
    for name in a.configs:
        over = CONFIGS[name]
        kw, _ = plugin_kwargs(dict(PP, **over, seed=a.seed))
        if 'stop_on' in over: kw['stop_on'] = over['stop_on']
        t0 = time.perf_counter()
        ps = train_plugin(tr, enc, tissue=a.tissue, label_key='label', **kw)
        o = plugin_outputs(ps, vv, a.tissue)
        rows.append(
            dict(
                config=name,
                n_train=tr.n_obs,
                n_val=vv.n_obs,
                val_macro_f1=round(ct._macro_f1(vv.obs.label.astype(str).to_numpy(), o.label.astype(str)), 3),
                best_epoch=ps.info[a.tissue]['best']['epoch'],
                epochs_run=len(ps.info[a.tissue]['log']),
                seconds=round(time.perf_counter() - t0, 1),
            )
        )
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == '__main__':
    main()
