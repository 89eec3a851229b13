"""Build the documentation site from nbs/ offline: execute the notebooks into _docs/src, then `mkdocs build`.

    python tools/build_docs.py                      # every notebook of nbs/ (about as long as `nbdev-test`)
    python tools/build_docs.py nbs/index.ipynb nbs/tutorials/02_knee_filters.ipynb   # some; the others are not pages
    python tools/build_docs.py --no-site ...        # executed notebooks only

A notebook committed with its outputs is copied as it is; one without outputs is executed (nbclient, in its own
directory, cells flagged `#| slow` or `#| eval: false` left out, as nbdev-test does). Outputs are made deterministic:
no execution timings, execution counts renumbered, the paths of this machine scrubbed
(`deepseq_nb.figures.scrub_paths`).
The site (`_docs/site`) is built by mkdocs with mkdocs-jupyter from `mkdocs.yml`; it needs no network.
"""
from __future__ import annotations
import argparse, os, re, shutil, subprocess, sys, time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r'^\s*#\|\s*(slow|eval:\s*false)\s*$', re.M)
ENV = dict(MPLBACKEND='module://matplotlib_inline.backend_inline',  # inline plots, even under `make`'s Agg
            OMP_NUM_THREADS='2', OPENBLAS_NUM_THREADS='2', MKL_NUM_THREADS='2', NUMBA_NUM_THREADS='2',
           PYTHONHASHSEED='0', OPENBLAS_CORETYPE='Haswell', TQDM_DISABLE='1', PYTHONWARNINGS='ignore')

# What changes from one execution to the next and is not the notebook's result: temporary directories, object
# addresses, and wall-clock timings written as `1.9 s` (a decimal number of seconds).
VOLATILE = [(r'/tmp/tmp[A-Za-z0-9_]+', '/tmp/tmpdir'), (r'\bat 0x[0-9a-f]+', 'at 0x…'), (r'\b\d+\.\d+ s\b', '… s')]

def has_outputs(nb)->bool:
    "Whether a notebook was committed with outputs."
    return any(c.get('outputs') for c in nb.cells if c.cell_type == 'code')

def execute(nb, cwd:Path, timeout:int)->str|None:
    "Execute `nb` in place (skipped cells keep no output); the error, or None."
    skipped = [c for c in nb.cells if c.cell_type == 'code' and SKIP.search(c.source)]
    for c in skipped: c.cell_type, c.source = 'raw', c.source  # nbclient runs code cells only
    old = {k: os.environ.get(k) for k in ENV}; os.environ.update(ENV)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(cwd)}},
                       allow_errors=False).execute()
        err = None
    except Exception as e:
        err = f'{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""}'
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
        for c in skipped: c.cell_type = 'code'; c.setdefault('outputs', []); c.setdefault('execution_count', None)
    return err

def deterministic(nb):
    "Drop timings and kernel metadata, renumber execution counts, scrub local paths from outputs."
    from deepseq_nb.figures import scrub_paths
    n = 0
    nb.metadata.pop('widgets', None)
    for c in nb.cells:
        c.metadata.pop('execution', None)
        if c.cell_type != 'code': continue
        n += 1; c.execution_count = n if c.get('outputs') else None
        for o in c.get('outputs', []):
            if o.output_type == 'execute_result': o.execution_count = n
    for c in nb.cells:  # progress bars (carriage-return redraws) say nothing once the cell has finished
        if c.cell_type == 'code':
            c.outputs = [
                o for o in c.get('outputs', []) if not (o.output_type == 'stream' and '\r' in o.get('text', ''))
            ]
    nb = nbformat.reads(scrub_paths(nbformat.writes(nb), ROOT), as_version=4)
    for c in nb.cells:  # outputs only: the notebook's own text stays as written
        for o in c.get('outputs', []) if c.cell_type == 'code' else []:
            if 'text' in o: o['text'] = _steady(o['text'])
            for k, v in o.get('data', {}).items():
                if k.startswith('text/') and isinstance(v, str): o['data'][k] = _steady(v)
    return nb

def _steady(text:str)->str:
    "`text` with its `VOLATILE` parts replaced."
    for pat, rep in VOLATILE: text = re.sub(pat, rep, text)
    return text

def build(notebooks:list[Path], out:Path, timeout:int=900, site:bool=True, log=print)->int:
    "Execute `notebooks` into `out/src` (mirroring nbs/), build the site into `out/site`; the number of failures."
    src = out/'src'
    if src.exists(): shutil.rmtree(src)
    failed = []
    for p in notebooks:
        p = p.resolve(); rel = p.relative_to(ROOT/'nbs') if p.is_relative_to(ROOT/'nbs') else Path(p.name)
        nb = nbformat.read(p, as_version=4)
        t0 = time.perf_counter()
        err = None if has_outputs(nb) else execute(nb, p.parent, timeout)
        how = 'committed outputs' if has_outputs(nb) and err is None and time.perf_counter() - t0 < 1 else 'executed'
        log(f"[docs] {rel}: {'FAILED ' + err if err else how} ({time.perf_counter() - t0:.0f} s)")
        if err: failed.append(str(rel))
        dst = src/rel; dst.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(deterministic(nb), dst)
    for extra in ('llms.txt',):
        if (ROOT/'nbs'/extra).exists(): shutil.copy2(ROOT/'nbs'/extra, src/extra)
    if site:
        r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--clean', '-f', str(ROOT/'mkdocs.yml'),
                            '-d', str((out/'site').resolve())], cwd=out,  # mkdocs-jupyter's .cache/ goes there
                           env=dict(os.environ, DOCS_SRC=str(src.resolve()), NO_MKDOCS_2_WARNING='1'))
        if r.returncode: failed.append('mkdocs build')
    if failed: log(f"[docs] failed: {', '.join(failed)}")
    return len(failed)

def main(argv=None)->int:
    P = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    P.add_argument('notebooks', nargs='*', type=Path, help='notebooks to build (default: every notebook under nbs/)')
    P.add_argument('--out', type=Path, default=ROOT/'_docs', help='output directory (default _docs/)')
    P.add_argument('--timeout', type=int, default=900, help='seconds per cell')
    P.add_argument('--no-site', action='store_true', help='execute the notebooks only; no mkdocs build')
    a = P.parse_args(argv)
    nbs = a.notebooks or sorted(p for p in (ROOT/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    return 1 if build(nbs, a.out, a.timeout, site=not a.no_site) else 0

if __name__ == '__main__': sys.exit(main())
