"""The base install: data -> QC -> clusters -> markers -> kb labels -> evaluation with no optional extra installed.

Each check runs in a fresh interpreter (`python -S`) whose only site directory is a view of the development
environment's site-packages without the extras' packages (torch, faiss, dask, papermill, the LLM clients, ...: the
modules of `config.EXTRAS`), so their imports fail and `find_spec` finds nothing, as where the extras are not installed.
"""
import json, os, subprocess, sys, sysconfig
from pathlib import Path

from deepseq_nb.config import EXTRAS

ROOT = Path(__file__).resolve().parents[1]


def _base_site(d:Path)->Path:
    "A directory of links to everything in site-packages except the extras' packages and their metadata."
    site = Path(sysconfig.get_paths()['purelib']); d.mkdir()
    for p in site.iterdir():
        stem = p.name.split('-')[0].split('.')[0].lower()
        if stem not in EXTRAS and stem != 'faiss_cpu': (d/p.name).symlink_to(p)
    return d


def _run(code:str, cwd:Path)->subprocess.CompletedProcess:
    env = os.environ | dict(PYTHONPATH=str(ROOT), MPLBACKEND='Agg')
    head = f"import site, sys; site.addsitedir({str(_base_site(cwd/'site'))!r})\n"
    return subprocess.run([sys.executable, '-S', '-c', head + code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_base_path_needs_no_extra(tmp_path):
    r = _run("""import json, anndata as ad
from deepseq_nb.cli import main
from deepseq_nb.config import EXTRAS
rc = main(['annotate', 'tenx_toy_filtered', '--out', 'a.h5ad', '-q', '--min-genes', '10', '--set', 'cluster.n_pcs=10'])
rc2 = main(['evaluate', 'a.h5ad', '--truth', 'cluster', '--pred', 'deepseq_label', '-q'])
a = ad.read_h5ad('a.h5ad')
print(json.dumps(dict(rc=rc, rc2=rc2, n=int(a.obs['deepseq_label'].notna().sum()),
                      extras=sorted(m for m in sys.modules if m.split('.')[0] in EXTRAS))))""", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == dict(rc=0, rc2=0, n=62, extras=[]), got


def test_missing_extra_is_named(tmp_path):
    (tmp_path/'m.csv').write_text('tissue,marker,manual_annotation\nPBMC,"CD3E, CD3D",T cell\n')
    r = _run("""
try: import deepseq_nb.memory
except ModuleNotFoundError as e: print(e)
try: import deepseq_nb.scale
except ModuleNotFoundError as e: print(e)
from deepseq_nb.cli import main
sys.exit(main(['benchmark', 'm.csv', '--backend', 'ollama:llama3.2:1b', '--set', 'annotate.max_retries=0']))""",
             tmp_path)
    lines = r.stdout.splitlines()
    assert "faiss is not installed: it comes with the optional extra [scagent]" in lines[0]
    assert "pip install 'deepseq_nb[scale]'" in lines[1]
    assert r.returncode == 2 and "ollama is not installed: it comes with the optional extra [llm]" in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr


def test_scagent_modules_name_their_extra(tmp_path):
    "scAgent modules import torch (faiss) at the top: without it a Python user is told which extra to install."
    r = _run("""
for m in ('encoder', 'pretrain', 'plugins', 'router', 'incremental', 'vector_index'):
    try: __import__(f'deepseq_nb.{m}')
    except ModuleNotFoundError as e: print(m, '|', e)""", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    names = ['encoder', 'pretrain', 'plugins', 'router', 'incremental', 'vector_index']
    assert [l.split(' |')[0] for l in lines] == names, lines
    assert all("is not installed: it comes with the optional extra [scagent]" in l for l in lines), lines
