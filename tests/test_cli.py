"The `deepseq` command as a user runs it, and a papermill run of a paper figure."
import subprocess, sys, json, hashlib
from pathlib import Path
import pandas as pd

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
    m = json.loads((tmp_path/'manifest.json').read_text())
    r = m['figures']['fig_qc_knee']
    assert r['status'] == 'ran' and r['seconds'] > 0 and (tmp_path/'fig_qc_knee.html').stat().st_size > 50_000
    csv = next(o for o in r['outputs'] if o['file'] == 'fig_qc_knee.csv')
    assert csv['sha256'] == hashlib.sha256((tmp_path/'fig_qc_knee.csv').read_bytes()).hexdigest()
    assert (
        m['versions']['scanpy'] and m['settings']['qc']['min_genes'] == 200 and len(m['settings_file']['sha256']) == 64
    )
    assert any(i['path'] == 'deepseq_nb/data/pbmc3k/pbmc3k_counts.h5ad' and len(i['sha256']) == 64 for i in m['inputs'])

def test_figures_unknown_name_and_bad_override():
    r = run('figures', '--only', 'fig_nope')
    assert r.returncode == 2 and 'fig_qc_knee' in r.stderr
    r = run('figures', '--set', 'cluster.resolutoin=2')
    assert r.returncode == 2 and 'Unknown setting' in r.stderr

def test_benchmark_kb_reports_unscorable_rows(tmp_path):
    bench = pd.DataFrame(
        {
            'dataset': ['a', 'a', 'b', 'b'],
            'tissue': ['PBMC', 'PBMC', None, 'PBMC'],
            'marker': ['MS4A1, CD79A, CD79B, CD19', 'LYZ, CD14, S100A8, S100A9, FCN1', 'PPBP, PF4, GP9', None],
            'manual_annotation': ['B cell', 'CD14+ monocyte', 'platelet', 'NK cell'],
        }
    )
    bench.to_csv(tmp_path/'b.csv', index=False)
    r = run('benchmark', tmp_path/'b.csv', '--backend', 'kb', '--out', tmp_path/'p.csv', '-q')
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith('mean agreement: ') and last.endswith('(n=4)')
    assert 'empty marker list: 1' in r.stdout
    p = pd.read_csv(tmp_path/'p.csv')
    assert (
        p.loc[0, 'agreement'] >= 0.5
        and 'B cell' in p.loc[0, 'prediction']
        and p.loc[3, 'agreement'] == 0
        and float(last.split()[2]) == round(p['agreement'].mean(), 3)
    )

def test_benchmark_missing_column(tmp_path):
    pd.DataFrame({'marker': ['CD3E']}).to_csv(tmp_path/'x.csv', index=False)
    r = run('benchmark', tmp_path/'x.csv')
    assert r.returncode == 2 and 'manual_annotation' in r.stderr

def test_evaluate_h5ad(tmp_path):
    import anndata as ad, numpy as np, scipy.sparse as sp

    obs = pd.DataFrame(
        {
            'truth': ['B cell'] * 5 + ['NK cell'] * 5,
            'pred': ['B cells'] * 5 + ['T cell'] * 5,
            'leiden': ['0'] * 5 + ['1'] * 5,
        }
    )
    ad.AnnData(sp.csr_matrix(np.ones((10, 2), np.float32)), obs=obs).write_h5ad(tmp_path/'e.h5ad')
    r = run('evaluate', tmp_path/'e.h5ad', '--truth', 'truth', '--pred', 'pred')
    assert r.returncode == 0, r.stderr
    assert 'accuracy: 0.500' in r.stdout and 'stage 1: skipped' in r.stdout

def test_figures_same_settings_same_tables(tmp_path):
    "Two runs with the same settings give byte-identical tables; the ledger counts the kb runs of the benchmark table."
    for d in ('a', 'b'):
        r = run('figures', '--only', 'tab_gptcelltype', '--out', tmp_path/d, '--no-html', '-q')
        assert r.returncode == 0, r.stderr
    csvs = sorted(p.name for p in (tmp_path/'a').glob('*.csv'))
    assert 'tab_gptcelltype.csv' in csvs and len(csvs) >= 3
    for c in csvs: assert (tmp_path/'a'/c).read_bytes() == (tmp_path/'b'/c).read_bytes(), c
    ma, mb = (json.loads((tmp_path/d/'manifest.json').read_text()) for d in ('a', 'b'))
    oa, ob = (
        {o['file']: o['sha256'] for o in m['figures']['tab_gptcelltype']['outputs'] if o['file'].endswith('.csv')}
        for m in (ma, mb)
    )
    assert oa == ob and len(oa) == len(csvs)
    kb = [l for l in ma['figures']['tab_gptcelltype']['llm'] if l['backend'] == 'kb']
    assert kb and kb[0]['runs'] >= 1 and kb[0]['calls'] == 0 and kb[0]['cost'] == 0

def test_figures_on_a_users_dataset(tmp_path):
    "A user's unlabelled h5ad: the figures that apply run, the others are skipped with why; bad input fails early."
    sys.path.insert(0, str(ROOT))
    from deepseq_nb.data import load_dataset
    a = load_dataset('pbmc3k')[:600].copy()
    del a.obs['cell_type']
    a.write_h5ad(tmp_path/'my data.h5ad')
    out = tmp_path/'run'
    r = run('figures', '--dataset', tmp_path/'my data.h5ad', '--only', 'fig_qc_knee', '--only', 'tab_cross_tissue',
            '--only', 'fig_incremental', '--out', out, '--no-html')
    assert r.returncode == 0, r.stderr
    m = json.loads((out/'manifest.json').read_text())
    f = m['figures']
    assert f['fig_qc_knee']['status'] == 'ran' and f['tab_cross_tissue']['status'] == 'skipped'
    assert 'blood and pancreas' in f['tab_cross_tissue']['reason'] and 'ground-truth' in f['fig_incremental']['reason']
    assert m['dataset']['n_obs'] == 600 and m['dataset']['label_key'] is None
    assert m['inputs'][-1]['sha256'] == hashlib.sha256((tmp_path/'my data.h5ad').read_bytes()).hexdigest()
    t = pd.read_csv(out/'fig_qc_knee.csv')
    assert set(t['dataset']) == {'my data.h5ad'} and not (out/'tab_cross_tissue.csv').exists()
    assert 'skipped' in r.stdout and 'fig_incremental' in r.stdout
    r = run('figures', '--dataset', tmp_path/'my data.h5ad', '--set', 'data.label_key=celltype', '--out', out)
    assert r.returncode == 2 and "data.label_key='celltype' is not a column" in r.stderr
    (tmp_path/'x.loom').write_text('nope')
    r = run('figures', '--dataset', tmp_path/'x.loom', '--out', out)
    assert r.returncode == 2 and 'Cannot tell the format' in r.stderr

def test_agent_is_a_deepseq_command():
    r = run('agent', 'annotate pbmc3k and tell me which clusters look novel', '--dry-run')
    assert r.returncode == 0, r.stderr
    steps = [l.split('(')[0].split('. ', 1)[1] for l in r.stdout.splitlines() if l[:1].isdigit() and '. ' in l]
    assert steps[0] == 'load_data' and steps[-1] == 'assess_novelty' and 'annotate' in steps
    r = run('agent', 'download the human cell atlas for me')
    assert r.returncode == 1 and 'load_data' not in r.stdout

def test_annotate_tissue_from_set_or_data(tmp_path):
    "A tissue named with --set reaches annotate; without it the data's own tissue is used, never the bundled default."
    import anndata as ad
    from deepseq_nb.figures import dataset_overrides
    r = run('annotate', 'pbmc3k', '--set', 'data.tissue=Lung', '--out', tmp_path/'a.h5ad', '-q')
    assert r.returncode == 0, r.stderr
    assert ad.read_h5ad(tmp_path/'a.h5ad').uns['deepseq']['params']['tissue'] == 'Lung'
    o = dataset_overrides('my.h5ad', {'label_key': None})
    assert o[:3] == ['data.dataset=my.h5ad', 'data.tissue=', 'data.species=']

def test_annotate_evidence_needs_an_llm_backend():
    r = run('annotate', 'pbmc3k', '--backend', 'kb', '--evidence')
    assert r.returncode == 2 and 'LLM --backend' in r.stderr and 'Traceback' not in r.stderr


def test_annotate_reads_a_tissue_from_the_clusters(tmp_path):
    "An h5ad that records no tissue: blood clusters give the hematopoietic prior, islets the pancreas; testis none."
    import anndata as ad
    from deepseq_nb.data import load
    from deepseq_nb.celltyping import HEMATOPOIETIC_TISSUE, without_tissue
    read = {'pbmc3k': HEMATOPOIETIC_TISSUE, 'pancreas_xin': 'pancreas'}  # testis: too few cells reach a lineage
    for name in ('pbmc3k', 'pancreas_xin', 'testis_mca'):
        a = without_tissue(load(name))
        a.write_h5ad(tmp_path/f'{name}.h5ad')
        r = run('annotate', tmp_path/f'{name}.h5ad', '--backend', 'kb', '--out', tmp_path/f'{name}_out.h5ad')
        assert r.returncode == 0, r.stderr
        p = ad.read_h5ad(tmp_path/f'{name}_out.h5ad').uns['deepseq']['params']
        if name in read:
            assert p['tissue'] == read[name] and p['tissue_from'] == 'expression'
            assert 'tissue not given' in r.stderr and '--tissue' in r.stderr  # the user is told, and how to set it
            assert f'tissue prior read from the clusters: {read[name]!r}' in r.stdout  # printed with -q too
        else: assert p['tissue'] == '' and p['tissue_from'] == '' and 'tissue prior' not in r.stdout + r.stderr


def test_annotate_reads_raw_of_a_scanpy_h5ad(tmp_path):
    "An h5ad as a scanpy analysis saves it (X: 2,000 HVGs, scaled; .raw: every gene) is annotated from its .raw."
    import anndata as ad, scanpy as sc
    from deepseq_nb.data import load
    a = load('pbmc3k'); sc.pp.normalize_total(a); sc.pp.log1p(a); sc.pp.highly_variable_genes(a, n_top_genes=2000)
    a.raw = a
    a = a[:, a.var['highly_variable']].copy(); a.X = a.X.toarray(); sc.pp.scale(a, max_value=10)
    a.uns.pop('x_is')  # as scanpy writes it: nothing says what X holds
    a.write_h5ad(tmp_path/'scanpy.h5ad')
    r = run('annotate', tmp_path/'scanpy.h5ad', '--tissue', 'PBMC', '--out', tmp_path/'o.h5ad')
    assert r.returncode == 0, r.stderr  # before: exit 2 on the scaled X
    assert 'negative values' in r.stderr and 'reading its .raw (13,714 genes)' in r.stderr
    o = ad.read_h5ad(tmp_path/'o.h5ad')
    assert o.n_vars == 13714 and o.obs['deepseq_broad'].astype(str).eq('T/NK cell').mean() > 0.4
    assert {'B cell', 'natural killer cell', 'CD14-positive monocyte'} <= set(o.obs['deepseq_label'].astype(str))


def test_annotate_own_clusters(tmp_path):
    "--groupby labels the clusters INPUT already has (pbmc3k's Seurat clusters): no QC, no clustering; bad columns: 2."
    import anndata as ad
    r = run('annotate', 'pbmc3k', '--groupby', 'seurat_cluster', '--tissue', 'PBMC', '--out', tmp_path/'o.h5ad', '-q')
    assert r.returncode == 0, r.stderr
    o = ad.read_h5ad(tmp_path/'o.h5ad')
    assert o.n_obs == 2638 and 'leiden' not in o.obs  # every cell kept, none clustered again
    per = o.obs.groupby('seurat_cluster', observed=True)['deepseq_label'].nunique()
    assert len(per) == 9 and (per == 1).all()  # one label per Seurat cluster
    lab = o.obs.groupby('cell_type', observed=True)['deepseq_label'].agg(lambda s: s.value_counts().index[0])
    assert lab['B'] == 'B cell' and lab['NK'] == 'natural killer cell' and lab['CD14+ Mono'] == 'CD14-positive monocyte'
    r = run('annotate', 'pbmc3k', '--groupby', 'louvain')
    assert r.returncode == 2 and "no obs column 'louvain'" in r.stderr and 'seurat_cluster' in r.stderr
    r = run('annotate', 'pbmc3k', '--groupby', 'n_counts')
    assert r.returncode == 2 and 'distinct values' in r.stderr and 'Traceback' not in r.stderr
