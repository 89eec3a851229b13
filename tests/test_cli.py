"The `deepseq` command as a user runs it, and a papermill run of a paper figure."
import subprocess, sys, json
from pathlib import Path
import pandas as pd, pytest

ROOT = Path(__file__).resolve().parents[1]
DEEPSEQ = [str(Path(sys.executable).parent/'deepseq')]  # the installed console script

def run(*args, cwd=ROOT):
    return subprocess.run([*DEEPSEQ, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)

def test_help_teaches():
    r = run('--help')
    assert r.returncode == 0 and 'examples:' in r.stdout and '--set' in r.stdout
    for c in ('qc', 'cluster', 'markers', 'figures'): assert c in r.stdout

def test_qc_knee_with_plot(tmp_path):
    r = run('qc', 'tenx_toy_raw', '--strategy', 'knee', '--plot', tmp_path/'k.png', '--out', tmp_path/'q.h5ad')
    assert r.returncode == 0, r.stderr
    assert 'kept: 62 of 1289' in r.stdout and (tmp_path/'k.png').stat().st_size > 10_000
    import anndata as ad
    assert ad.read_h5ad(tmp_path/'q.h5ad').obs['qc_pass'].sum() == 62

def test_qc_errors_are_one_line():
    r = run('qc', 'pancreas_xin')
    assert r.returncode == 2 and 'needs raw counts' in r.stderr and 'Traceback' not in r.stderr
    r = run('qc', 'pbmc3k', '--set', 'qc.min_gene=100')
    assert r.returncode == 2 and 'Unknown setting qc.min_gene' in r.stderr and 'min_genes' in r.stderr
    r = run('qc', 'does/not/exist.h5ad')
    assert r.returncode == 2 and 'No such file' in r.stderr

def test_cluster_then_markers(tmp_path):
    r = run('cluster', 'pbmc3k', '--out', tmp_path/'c.h5ad', '--set', 'cluster.n_top_genes=1000', '-q')
    assert r.returncode == 0, r.stderr
    r = run('markers', tmp_path/'c.h5ad', '--n-genes', 5, '--csv', tmp_path/'m.csv', '-q')
    assert r.returncode == 0, r.stderr
    m = pd.read_csv(tmp_path/'m.csv')
    assert set(m.columns) >= {'cluster', 'rank', 'gene', 'logfoldchange', 'pval_adj', 'pct_in', 'pct_out'}
    assert m.groupby('cluster').size().max() == 5 and m['rank'].max() == 5
    assert any('MS4A1' in l or 'CD79A' in l for l in r.stdout.splitlines())

def test_figures_qc_knee_papermill(tmp_path):
    r = run('figures', '--only', 'fig_qc_knee', '--out', tmp_path)
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path/'fig_qc_knee.csv')
    toy = t[t.dataset == 'tenx_toy_raw'].set_index('strategy')
    assert toy.loc['knee', 'recall'] >= 0.95 and toy.loc['smoothed_knee', 'precision'] >= 0.9
    assert (t[t.dataset == 'pbmc3k']['n_kept'] == 2638).all()
    assert (tmp_path/'fig_qc_knee.png').stat().st_size > 20_000 and (tmp_path/'fig_qc_knee.ipynb').exists()
    assert json.loads((tmp_path/'figures_run.json').read_text())['figures'][0]['name'] == 'fig_qc_knee'

def test_figures_unknown_name_and_bad_override():
    r = run('figures', '--only', 'fig_nope')
    assert r.returncode == 2 and 'fig_qc_knee' in r.stderr
    r = run('figures', '--set', 'cluster.resolutoin=2')
    assert r.returncode == 2 and 'Unknown setting' in r.stderr

def test_benchmark_kb_reports_unscorable_rows(tmp_path):
    bench = pd.DataFrame({'dataset': ['a', 'a', 'b', 'b'], 'tissue': ['PBMC', 'PBMC', None, 'PBMC'],
                          'marker': ['MS4A1, CD79A, CD79B, CD19', 'LYZ, CD14, S100A8, S100A9, FCN1', 'PPBP, PF4, GP9', None],
                          'manual_annotation': ['B cell', 'CD14+ monocyte', 'platelet', 'NK cell']})
    bench.to_csv(tmp_path/'b.csv', index=False)
    r = run('benchmark', tmp_path/'b.csv', '--backend', 'kb', '--out', tmp_path/'p.csv', '-q')
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith('mean agreement: ') and last.endswith('(n=4)')
    assert 'empty marker list: 1' in r.stdout
    p = pd.read_csv(tmp_path/'p.csv')
    assert p.loc[0, 'agreement'] >= 0.5 and 'B cell' in p.loc[0, 'prediction'] and p.loc[3, 'agreement'] == 0 and float(last.split()[2]) == round(p['agreement'].mean(), 3)

def test_benchmark_missing_column(tmp_path):
    pd.DataFrame({'marker': ['CD3E']}).to_csv(tmp_path/'x.csv', index=False)
    r = run('benchmark', tmp_path/'x.csv')
    assert r.returncode == 2 and 'manual_annotation' in r.stderr

def test_evaluate_h5ad(tmp_path):
    import anndata as ad, numpy as np, scipy.sparse as sp
    obs = pd.DataFrame({'truth': ['B cell']*5 + ['NK cell']*5, 'pred': ['B cells']*5 + ['T cell']*5, 'leiden': ['0']*5 + ['1']*5})
    ad.AnnData(sp.csr_matrix(np.ones((10, 2), np.float32)), obs=obs).write_h5ad(tmp_path/'e.h5ad')
    r = run('evaluate', tmp_path/'e.h5ad', '--truth', 'truth', '--pred', 'pred')
    assert r.returncode == 0, r.stderr
    assert 'accuracy: 0.500' in r.stdout and 'stage 1: skipped' in r.stdout
