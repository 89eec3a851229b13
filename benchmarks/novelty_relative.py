"""Time and peak memory of query-relative novelty (deepseq_nb.novelty_query.relative_novelty, what the agent's
assess_novelty runs) for a query of n cells against the PBMC3k reference. No target is set; the figures say what a
user's session costs.

Usage: python benchmarks/novelty_relative.py [--sizes 2000 10000]

Data: the bundled PBMC3k, log-normalised; 80 % of it is the reference, 20 % the calibration cells, and the query is
PBMC3k's cells repeated to n (sparse). Each size runs in its own process, so that its peak resident memory
(ru_maxrss) is its own. Measured on the development machine (2 cores), 10,000 cells: 55 s and 1.7 GB peak with the
sparse path of `joint_space` (above `DENSE_MAX` values); the earlier all-dense path took 121 s and 4.6 GB.
Prints one line per size: cells, seconds, peak RSS in GB, share of query cells flagged.
"""
import argparse, os, subprocess, sys, time, warnings
for v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMBA_NUM_THREADS'):
    os.environ.setdefault(v, '2')
warnings.filterwarnings('ignore')


def one(n:int)->str:
    "Run relative_novelty for a query of `n` cells in this process; its result line."
    import resource
    import numpy as np, anndata as ad, scipy.sparse as sp
    from deepseq_nb.data import load_dataset
    from deepseq_nb.cluster import normalize
    from deepseq_nb.utils import stratified_split
    from deepseq_nb.novelty_query import relative_novelty
    ref = load_dataset('pbmc3k'); normalize(ref); ref.obs['label'] = ref.obs['cell_type'].astype(str)
    cal = stratified_split(ref.obs['label'].to_numpy(), 0.2, seed=0)
    q = ad.concat([ref] * int(np.ceil(n / ref.n_obs)), index_unique='-')[:n].copy()
    q.X = sp.csr_matrix(q.X)
    t0 = time.perf_counter()
    o = relative_novelty(ref[~cal].copy(), q, ref[cal].copy(), tissue='blood')
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # kilobytes on Linux
    return f"{n:>8} cells  {secs:7.1f} s  peak RSS {peak:5.2f} GB  flagged {o['cells'].is_novel.mean():.3f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=[2000, 10000])
    ap.add_argument('--one', type=int, help=argparse.SUPPRESS)   # internal: run one size in this process
    args = ap.parse_args(argv)
    if args.one: print(one(args.one), flush=True); return 0
    for n in args.sizes:
        r = subprocess.run([sys.executable, __file__, '--one', str(n)], capture_output=True, text=True)
        print(r.stdout.strip() if r.returncode == 0 else f"{n:>8} cells  failed: {r.stderr.strip()[-300:]}", flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
