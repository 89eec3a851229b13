"The figures driver: runs never touch the committed record, `--update-results` merges, `--check` uses tolerances."
import hashlib, json, re, shutil, subprocess, sys
from pathlib import Path
import pandas as pd, pytest
from deepseq_nb.figures import publish_results, list_figures
from deepseq_nb.figure_check import compare_tables

ROOT = Path(__file__).resolve().parents[1]
FIG = ROOT/'paper_figures'
DEEPSEQ = [str(Path(sys.executable).parent/'deepseq')]

def run(*args, cwd=ROOT, timeout=900):
    return subprocess.run([*DEEPSEQ, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)

def record_digest():
    "SHA-256 of every file of the committed record (paper_figures/results and its README)."
    files = sorted((FIG/'results').iterdir()) + [FIG/'README.md']
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

# --- the comparison, on small hand-made tables -------------------------------------------------------------------

OLD = pd.DataFrame(dict(leiden=[0, 1, 2], n_cells=[591, 571, 341], share=[0.904, 0.72, 1.0], label=['T', 'T', 'B']))

def test_identical_tables_have_no_difference():
    assert compare_tables(OLD, OLD.copy(), key=['leiden']).empty

def test_counts_are_exact_unless_a_tolerance_is_stated():
    new = OLD.assign(n_cells=[581, 571, 341])
    r = compare_tables(OLD, new, key=['leiden'])
    assert r[['row', 'column', 'diff', 'tol', 'ok']].values.tolist() == [['leiden=0', 'n_cells', -10, 0.0, False]]
    r = compare_tables(OLD, new, key=['leiden'], tolerance={'n_cells': 20})
    assert r['ok'].tolist() == [True] and r['tol'].tolist() == [20.0]
    assert not compare_tables(OLD, OLD.assign(n_cells=[570, 571, 341]), key=['leiden'], tolerance={'n_cells': 20})[
        'ok'
    ].any()

def test_published_rows_are_exact_whatever_the_tolerance():
    t = pd.DataFrame(
        dict(method=['kb', 'GPT-4'], source=['measured', 'published (arXiv 2506.13817)'], value=[0.5, 0.825])
    )
    r = compare_tables(t, t.assign(value=[0.51, 0.826]), key=['method'], tolerance={'value': 0.05})
    assert r.set_index('row')['ok'].to_dict() == {'method=kb': True, 'method=GPT-4': False}
    assert r.set_index('row').loc['method=GPT-4', 'what'] == 'published value'

def test_text_rows_and_columns_must_match():
    new = pd.DataFrame(dict(leiden=[0, 1, 3], n_cells=[591, 571, 9], share=[0.904, 0.72, 1.0], label=['T', 'NK', 'B'],
                            extra=[1, 2, 3]))
    r = compare_tables(OLD, new, key=['leiden'], tolerance={'n_cells': 100})
    got = set(map(tuple, r[['row', 'column', 'what']].values.tolist()))
    assert got == {('', 'extra', 'column not in committed table'), ('leiden=2', '', 'row missing in rerun'),
                   ('leiden=3', '', 'row not in committed table'), ('leiden=1', 'label', 'text')}
    assert not r['ok'].any()

def test_regex_columns_row_tolerances_and_ignored_columns():
    t = pd.DataFrame(
        dict(held_out=['NK', 'B'], auroc_frozen=[0.70, 0.80], auroc_tuned=[0.6, 0.9], seconds=[10.0, 12.0])
    )
    r = compare_tables(t, t.assign(auroc_frozen=[0.714, 0.80], auroc_tuned=[0.6, 0.95], seconds=[99.0, 1.0]),
                       key=['held_out'], tolerance={'auroc_.*': 0.03}, ignore=['seconds'])
    assert r[['row', 'column', 'ok']].values.tolist() == [
        ['held_out=NK', 'auroc_frozen', True],
        ['held_out=B', 'auroc_tuned', False],
    ]
    wide = pd.DataFrame({'Unnamed: 0': ['auroc_a', 'detection_a'], 'pbmc3k': [0.6, 0.2]})
    r = compare_tables(wide, wide.assign(pbmc3k=[0.62, 0.32]), row_tolerance={'auroc_.*': 0.03, 'detection_.*': 0.1})
    assert r['ok'].tolist() == [True, False]

def test_duplicate_keys_are_matched_in_order():
    t = pd.DataFrame(dict(k=['a', 'a'], v=[1, 2]))
    assert compare_tables(t, t.copy()).empty
    assert compare_tables(t, t.assign(v=[1, 3]))['row'].tolist() == ['k=a #1']

# --- the committed record ----------------------------------------------------------------------------------------

def test_every_tolerance_file_names_committed_tables_and_existing_key_columns():
    for n in list_figures():
        p = FIG/f'{n}.tolerances.json'
        if not p.exists(): continue
        for t, spec in json.loads(p.read_text())['tables'].items():
            df = pd.read_csv(FIG/'results'/t)
            key = spec.get('key') or list(df.columns[:1])
            assert set(key) <= set(df.columns) and not df.duplicated(key).any(), (t, key)

def test_committed_record_has_no_local_paths_and_a_full_gallery():
    m = json.loads((FIG/'results/manifest.json').read_text())
    readme = (FIG/'README.md').read_text()
    for n in m['figures']: assert f'## {n}' in readme or m['figures'][n]['status'] != 'ran', n
    assert not Path(m['settings_file']['path']).is_absolute()
    for p in (FIG/'results').glob('*.html'):
        assert not re.search(r'/(work|home|root|tmp|Users)/', p.read_text(encoding='utf-8')), p.name

def fake_run(d:Path, figs:dict, **extra)->Path:
    d.mkdir(parents=True, exist_ok=True); recs = {}
    for n, files in figs.items():
        for f, text in files.items(): (d/f).write_text(text)
        recs[n] = dict(status='ran', created='2030-01-01', seconds=1.0, llm=[],
                       outputs=[dict(file=f, bytes=1, sha256='') for f in files])
    (d/'manifest.json').write_text(json.dumps(dict(created='2030-01-01', versions={}, overrides=[], dataset=None,
                                                   figures=recs, **extra)))
    return d

def test_update_results_keeps_the_other_figures(tmp_path):
    fd = tmp_path/'paper_figures'; shutil.copytree(FIG, fd, ignore=shutil.ignore_patterns('out', 'runs'))
    (tmp_path/'settings.ini').write_text(''); (tmp_path/'pyproject.toml').write_text('')
    before = json.loads((fd/'results/manifest.json').read_text())['figures']
    csv = (fd/'results/fig_qc_knee.csv').read_text()
    fake_run(
        tmp_path / 'run', {'fig_qc_knee': {'fig_qc_knee.csv': csv.replace('2638', '2637', 1), 'fig_qc_knee.png': 'png'}}
    )
    publish_results(tmp_path/'run', fd, log=lambda *a: None)
    after = json.loads((fd/'results/manifest.json').read_text())['figures']
    assert set(after) == set(before) and after['fig_qc_knee']['created'] == '2030-01-01'
    assert {k: v for k, v in after.items() if k != 'fig_qc_knee'} == {
        k: v for k, v in before.items() if k != 'fig_qc_knee'
    }
    heads = lambda p: [l for l in p.read_text().splitlines() if l.startswith('## ')]
    assert heads(fd/'README.md') == heads(FIG/'README.md') and len(heads(FIG/'README.md')) == len(before)
    assert not (fd/'results/fig_qc_knee.html').exists()  # the run wrote no HTML: the stale copy is gone
    assert '2637' in (fd/'results/fig_qc_knee.csv').read_text()

def test_update_results_refuses_a_run_with_overrides(tmp_path):
    fake_run(tmp_path/'run', {'fig_qc_knee': {'fig_qc_knee.csv': 'a\n1\n'}}, )
    m = json.loads((tmp_path/'run/manifest.json').read_text()); m['overrides'] = ['qc.min_genes=100']
    (tmp_path/'run/manifest.json').write_text(json.dumps(m))
    with pytest.raises(ValueError, match='cannot become the committed record'): publish_results(tmp_path/'run', FIG)

def test_check_of_a_run_dir_fails_outside_tolerance_and_says_by_how_much(tmp_path):
    "`deepseq figures --check RUN_DIR`: no rerun; rc 1 with the moved value printed; rc 0 when within tolerance."
    sizes = pd.read_csv(FIG/'results/fig_clusters_sizes.csv')
    files = {t: (FIG/'results'/t).read_text() for t in ('fig_clusters_markers.csv', 'fig_clusters_sizes.csv')}
    fake_run(tmp_path/'near', {'fig_clusters': dict(files, **{'fig_clusters_sizes.csv': sizes.assign(
        n_cells=sizes.n_cells + ([-10] + [0]*(len(sizes)-1))).to_csv(index=False)})})
    r = run('figures', '--check', tmp_path/'near', '-q')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'n_cells: 1 value(s) moved, most -10' in r.stdout and 'every table within tolerance' in r.stdout
    fake_run(tmp_path/'far', {'fig_clusters': dict(files, **{'fig_clusters_sizes.csv': sizes.assign(
        n_cells=sizes.n_cells + ([-50] + [0]*(len(sizes)-1))).to_csv(index=False)})})
    r = run('figures', '--check', tmp_path/'far', '-q')
    assert r.returncode == 1
    assert re.search(
        r'FAIL fig_clusters: fig_clusters_sizes.csv · leiden=0 · n_cells: value \d+ -> \d+ \(moved -50, tolerance 20\)',
        r.stdout,
    )

def test_a_figure_run_leaves_the_committed_record_alone():
    "`deepseq figures --only fig_qc_knee --check` in the checkout: writes paper_figures/out only, and passes the check."
    before = record_digest()
    r = run('figures', '--only', 'fig_qc_knee', '--check', '-q')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'check: every table equals the committed one.' in r.stdout
    assert record_digest() == before
    html = (FIG/'out/fig_qc_knee.html').read_text(encoding='utf-8')
    assert 'out_dir = &quot;paper_figures/out&quot;' in html or "paper_figures/out" in html
    assert not re.search(r'/(work|home|root|tmp|Users)/', html)

@pytest.mark.slow
def test_every_figure_reproduces_within_its_tolerances(tmp_path):
    "The whole check: every figure rerun (about 40 min on 2 cores), every table within the tolerances beside it."
    before = record_digest()
    r = run('figures', '--out', tmp_path, '--check', '--no-html', timeout=4*3600)
    print(r.stdout[-5000:])
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert record_digest() == before

# --- documentation ------------------------------------------------------------------------------------------------

def test_readme_quick_start_is_the_tested_cell_of_index():
    nb = json.loads((ROOT/'nbs/index.ipynb').read_text())
    code = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']
    qs = next(c for c in code if 'load_dataset' in c)
    assert f"```python\n{qs}\n```" in (ROOT/'README.md').read_text()
    assert any('assert' in c and 'labels' in c for c in code)  # the quick start is checked, not only run

@pytest.mark.parametrize(
    'nb', sorted(str(p.relative_to(ROOT)) for p in [*FIG.glob('*.ipynb'), *(ROOT / 'nbs/tutorials').glob('*.ipynb')])
)
def test_papermill_reads_every_parameter(nb, caplog):
    "papermill parses each line of a parameters cell (a second `=` in a comment hides the parameter from it)."
    import nbformat
    from papermill.translators import PythonTranslator
    src = json.loads((ROOT/nb).read_text())
    cells = [c for c in src['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    if not cells: pytest.skip('no parameters cell')
    names = [l.split('=')[0].split(':')[0].strip() for l in ''.join(cells[0]['source']).splitlines()
             if '=' in l and not l.lstrip().startswith('#')]
    with caplog.at_level('WARNING', logger='papermill'):
        got = [
            p.name
            for p in PythonTranslator.inspect(nbformat.from_dict(dict(cells[0], source=''.join(cells[0]['source']))))
        ]
    assert got == names and 'Unable to parse' not in caplog.text
