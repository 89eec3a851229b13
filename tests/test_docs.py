"`make docs`: notebooks executed deterministically into _docs/src, and a static site whose pages show the plots."
import json, re, sys
from pathlib import Path
import nbformat, pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import build_docs  # noqa: E402 (tools/ is on the path only from the line above)

def notebook(path:Path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell('# A page\n\nProse above a plot.'),
            nbformat.v4.new_code_cell(
                'import matplotlib.pyplot as plt, os\nplt.plot([1, 3, 2]); plt.title("a plot"); plt.show()'
            ),
            nbformat.v4.new_code_cell('print(os.getcwd())'),
            nbformat.v4.new_code_cell('#| slow\nraise SystemExit("slow cells are not executed")'),
            nbformat.v4.new_code_cell('1 + 1'),
        ]
    )
    nbformat.write(nb, path)

def test_docs_site_shows_plots_and_outputs_are_deterministic(tmp_path):
    pytest.importorskip('mkdocs'); pytest.importorskip('mkdocs_jupyter')
    notebook(tmp_path/'page.ipynb')
    out = tmp_path/'docs'
    assert build_docs.build([tmp_path/'page.ipynb'], out, timeout=120, log=lambda *a: None) == 0
    nb = json.loads((out/'src/page.ipynb').read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert any(o.get('data', {}).get('image/png') for o in code[0]['outputs'])       # the plot is an output
    assert code[2]['outputs'] == [] and ''.join(code[3]['outputs'][0]['data']['text/plain']) == '2'
    assert [c['execution_count'] for c in code] == [1, 2, None, 4]
    assert not any('execution' in c['metadata'] for c in nb['cells'])  # no timings
    assert ''.join(code[1]['outputs'][0]['text']).strip() == str(tmp_path)  # ran in the notebook's directory
    html = (out/'site/page.html').read_text(encoding='utf-8')
    assert 'Prose above a plot' in html and re.search(r'<img[^>]+src="data:image/png;base64,', html)
    assert not re.search(r'<link[^>]+fonts.googleapis', html)                        # offline: no web fonts
    again = tmp_path/'again'; build_docs.build([tmp_path/'page.ipynb'], again, site=False, log=lambda *a: None)
    strip = lambda p: re.sub(r'"image/png": "[^"]*"', '', p.read_text())           # PNG bytes may carry metadata
    assert strip(again/'src/page.ipynb') == strip(out/'src/page.ipynb')              # same notebook, same text

def test_docs_paths_of_this_checkout_are_scrubbed(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x')])
    nb.cells[0].outputs = [nbformat.v4.new_output('stream', text=f'{ROOT}/deepseq_nb/figures.py:1: warning\n')]
    nb.cells[0].metadata['execution'] = {'iopub.execute_input': '2026-01-01T00:00:00'}
    d = build_docs.deterministic(nb)
    assert d.cells[0].outputs[0].text == 'deepseq_nb/figures.py:1: warning\n' and 'execution' not in d.cells[0].metadata


def test_wrap_long_lines(tmp_path):
    "tools/wrap_long_lines.py: long lines wrapped, crowded docment lines split, the syntax tree unchanged."
    import ast, wrap_long_lines as w
    if w.RUFF is None: pytest.skip('ruff is not installed')
    words = 'word ' * 30
    src = ("def f(a:int, b:int=1, # the b\n      c:str='x')->dict:\n"
           "    return dict(alpha=a, beta=b, gamma=c, " + ', '.join(f'key_{i}={i}' for i in range(20)) + ")\n\n"
           f"y = print('{words}', f'{words}{{1}}')\n")
    new = w.wrap(src, tmp_path/'cell.py')
    assert max(len(x) for x in src.split('\n')) > 120 and max(len(x) for x in new.split('\n')) <= 120
    assert ast.dump(ast.parse(new)) == ast.dump(ast.parse(src))
    assert '    b: int = 1,  # the b' in new.split('\n')  # the docment's parameter alone on its line
    assert w.wrap('%time x = 1\n', tmp_path/'cell.py') == '%time x = 1\n'  # magics: left alone
