"""The package as a user installs it: its wheel, in a fresh virtual environment outside the checkout, no network.

The new environment sees the already-installed dependencies through a `.pth` line naming the development
environment's site-packages (no download), but not the editable deepseq_nb of the checkout: a path line in a `.pth`
file does not run the `.pth` files of the directory it names, so the editable finder stays inactive, and every test
asserts that `deepseq_nb` is imported from the new environment. Nothing names a settings file: the runs start from
the defaults inside the wheel.
"""
import json, os, re, subprocess, sys, sysconfig, venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(home:Path)->dict:
    "The environment of a user's shell: no PYTHONPATH or settings file of ours, a private cache, no user site."
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'DEEPSEQ_SETTINGS', 'VIRTUAL_ENV')}
    return env | dict(DEEPSEQ_CACHE=str(home/'cache'), PYTHONNOUSERSITE='1', MPLBACKEND='Agg', HOME=str(home))


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    "A virtual environment in a temporary directory with the wheel built from this checkout installed (not editable)."
    tmp = tmp_path_factory.mktemp('wheel')
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
                        '-w', str(tmp/'dist'), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel, = (tmp/'dist').glob('deepseq_nb-*.whl')
    venv.create(tmp/'venv', with_pip=False, symlinks=True)
    py = tmp/'venv/bin/python'
    site = Path(subprocess.check_output([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                        text=True).strip())
    deps = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}   # the development environment's
    (site/'zz_shared_dependencies.pth').write_text(''.join(f'{d}\n' for d in sorted(deps)))
    home = tmp/'home'; (home/'work').mkdir(parents=True)
    r = subprocess.run([py, '-m', 'pip', 'install', '--no-deps', '--no-index', '--ignore-installed', '-q', str(wheel)],
                       capture_output=True, text=True, cwd=home, env=_env(home), timeout=600)
    assert r.returncode == 0, r.stderr
    return dict(venv=tmp/'venv', py=py, site=site, home=home, work=home/'work', env=_env(home))


def _python(inst, code:str, timeout=600)->dict:
    "Run `code` with the new environment's python in a directory outside the checkout; the JSON it prints last."
    r = subprocess.run([inst['py'], '-c', code], capture_output=True, text=True, cwd=inst['work'], env=inst['env'],
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _deepseq(inst, *args, timeout=600):
    return subprocess.run([inst['venv']/'bin/deepseq', *map(str, args)], capture_output=True, text=True,
                          cwd=inst['work'], env=inst['env'], timeout=timeout)


def test_installed_copy_ships_its_defaults(installed):
    got = _python(installed, """import json, deepseq_nb
from deepseq_nb.config import packaged_settings, user_settings_path, load_settings
S = load_settings()
print(json.dumps(dict(pkg=deepseq_nb.__file__, defaults=str(packaged_settings()), user=str(user_settings_path()),
                      min_genes=S.get('qc.min_genes'), sections=list(S))))""")
    site = str(installed['site'])
    assert got['pkg'].startswith(site) and got['user'] == 'None'
    assert got['defaults'] == f'{site}/deepseq_nb/settings.ini'
    assert (installed['site']/'deepseq_nb/settings.ini').read_bytes() == (ROOT/'settings.ini').read_bytes()
    assert got['min_genes'] == 200 and got['sections'][:3] == ['data', 'qc', 'cluster']


def test_installed_cli_runs_with_no_settings_file(installed):
    r = _deepseq(installed, 'qc', 'pbmc3k', '--out', 'qc.h5ad')
    assert r.returncode == 0, r.stderr
    assert 'kept: 2638 of 2638' in r.stdout and (installed['work']/'qc.h5ad').stat().st_size > 1_000_000
    (installed['work']/'mine.ini').write_text('[qc]\nmin_genes = 600\n')   # a user's file: only what it changes
    r = _deepseq(installed, 'qc', 'pbmc3k', '--settings', 'mine.ini')
    kept = int(re.search(r'kept: (\d+) of 2638', r.stdout).group(1))
    assert r.returncode == 0 and 0 < kept < 2638, r.stderr
    r = _deepseq(installed, 'qc', 'pbmc3k', '--settings', 'missing.ini')
    assert r.returncode == 2 and 'settings file missing.ini not found' in r.stderr and 'Traceback' not in r.stderr


def test_installed_annotate_and_readme_snippet(installed):  # in CI (about 1.5 min on 2 cores): issue 23's check
    r = _deepseq(installed, 'annotate', 'pbmc3k', '--out', 'annotated.h5ad', '-q')
    assert r.returncode == 0, r.stderr
    got = _python(installed, """import json, anndata as ad, deepseq_nb
a = ad.read_h5ad('annotated.h5ad')
print(json.dumps(dict(pkg=deepseq_nb.__file__, broad=sorted(set(a.obs['deepseq_broad'].astype(str))))))""")
    assert got['pkg'].startswith(str(installed['site']))
    assert {'T/NK cell', 'B cell', 'monocyte/macrophage'} <= set(got['broad'])
    snippet = re.search(r'## In Python.*?```python\n(.*?)```', (ROOT/'README.md').read_text(), re.S).group(1)
    got = _python(installed, snippet + """
import json, deepseq_nb
print(json.dumps(dict(pkg=deepseq_nb.__file__, n=len(labels), broad=sorted(labels['broad'].astype(str)))))""")
    assert got['pkg'].startswith(str(installed['site'])) and got['n'] >= 8
    assert {'T/NK cell', 'B cell', 'monocyte/macrophage'} <= set(got['broad'])
