"""Runtime of the expression-aware kb annotation (deepseq_nb.celltyping via annotate(backend='kb')) on a clustered
10^5-cell dataset, as a share of run_scaled's own time. Target: annotation adds <= 10 % to run_scaled.

Usage: python benchmarks/annotation.py [--sizes 100000] [--workdir /tmp/deepseq_scale] [--repeat 3] [--ref-cells 0]

Data: `synthetic_counts(n)` resampled from the bundled PBMC3k counts (seed 0; the same file benchmarks/scale.py writes,
WORKDIR/synthetic_{n}.h5ad, reused when present). run_scaled(path, annotate=False) runs QC -> markers in memory and is
timed as a whole; then annotate(backend='kb') on that clustered AnnData is timed `--repeat` times (the first run
includes building the marker network; the knowledge base itself is cached on disk), and for reference the marker-list
kb path (kb_mode='markers'). The synthetic cells keep PBMC3k's labels, so the agreement of the labels with them is
printed too (in-sample for pbmc3k, which was used to design the engine, and for `celltyping.REF_CELLS`, designed on
these files; `--ref-cells 0` reads the reference partition on the whole graph, as before it).
Prints one line per size: run_scaled seconds, annotation seconds (first, median of the rest), ratio, target met.
"""
import argparse, os, sys, time, warnings
from pathlib import Path
for v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMBA_NUM_THREADS'):
    os.environ.setdefault(v, '2')
warnings.filterwarnings('ignore')

TARGET = 0.10  # annotation time / run_scaled time

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=[100_000])
    ap.add_argument('--workdir', default='/tmp/deepseq_scale')
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--ref-cells', type=int, default=None, help='celltyping.REF_CELLS (default: shipped; 0: off)')
    args = ap.parse_args(argv)
    import numpy as np, pandas as pd
    from deepseq_nb.scale import synthetic_counts, run_scaled
    from deepseq_nb.annotate import annotate
    import deepseq_nb.celltyping as ct
    from deepseq_nb.celltyping import score_annotation
    if args.ref_cells is not None: ct.REF_CELLS = args.ref_cells
    wd = Path(args.workdir); wd.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        p = wd/f'synthetic_{n}.h5ad'
        if not p.exists(): synthetic_counts(n, path=p, seed=0)
        t0 = time.perf_counter(); a = run_scaled(str(p), annotate=False); t_run = time.perf_counter() - t0
        ts = []
        for _ in range(max(args.repeat, 1)):
            t0 = time.perf_counter(); annotate(a, groupby='leiden', backend='kb'); ts.append(time.perf_counter() - t0)
        sc = score_annotation(a.obs['cell_type'], a.obs['deepseq_label'], 'PBMC') if 'cell_type' in a.obs else {}
        t0 = time.perf_counter(); annotate(a, groupby='leiden', backend='kb', kb_mode='markers', key_added='kb_markers')
        t_mk = time.perf_counter() - t0
        rest = float(np.median(ts[1:])) if len(ts) > 1 else ts[0]
        rows.append(
            dict(
                n_cells=a.n_obs,
                clusters=a.obs['leiden'].nunique(),
                n_genes=a.n_vars,
                run_scaled_s=round(t_run, 1),
                annotate_first_s=round(ts[0], 2),
                annotate_s=round(rest, 2),
                ratio_first=round(ts[0] / t_run, 4),
                ratio=round(rest / t_run, 4),
                target=TARGET,
                met=bool(ts[0] / t_run <= TARGET),
                markers_path_s=round(t_mk, 2),
                **{k: round(v, 3) for k, v in sc.items() if k != 'n_cells'},
            )
        )
    d = pd.DataFrame(rows)
    print(d.to_string(index=False))
    return 0 if d['met'].all() else 1

if __name__ == '__main__': sys.exit(main())
