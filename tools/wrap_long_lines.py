"""Wrap the lines ruff finds over 120 characters (E501) in notebooks and .py files, touching nothing else.

    python tools/wrap_long_lines.py nbs/13_novelty.ipynb tests/test_novelty.py   # rewrite in place
    python tools/wrap_long_lines.py --dry-run nbs/13_novelty.ipynb                 # say what would change

For each code cell (or .py file) with a long line, in this order:
1. `ruff format --range` on that line only (quotes preserved), so the rest of the cell keeps its compact style;
2. signatures whose docment lines hold several parameters: the signature alone is formatted, one parameter per line;
3. a long string literal alone on its line inside brackets is split into two adjacent literals at a space;
4. a statement the formatter wrapped in parentheses only to fit its trailing comment (`x = (\\n 1.0  # why\\n)`)
   goes back on one line with the comment on the line above.
A cell is written back only if its syntax tree is unchanged (a string split into adjacent literals compares equal;
an f-string part left without placeholders loses its `f`). Cells with IPython magics are left alone. What is
left (long comments, docstrings, URLs) needs a person: `ruff check` lists it. Run nbdev-clean after.
"""
from __future__ import annotations
import argparse, ast, io, json, re, shutil, subprocess, sys, tempfile, tokenize
from pathlib import Path


def _ruff()->str|None:
    "The ruff binary: the `ruff` package's, else next to this Python, else on PATH."
    try:
        from ruff.__main__ import find_ruff_bin
        return str(find_ruff_bin())
    except (ImportError, FileNotFoundError): pass
    here = Path(sys.executable).with_name('ruff')
    return str(here) if here.exists() else shutil.which('ruff')


RUFF = _ruff()
LIMIT = 120
FORMAT = ['--isolated', '--config', f'line-length={LIMIT}', '--config', "format.quote-style='preserve'"]


def _long_rows(path:Path)->list[int]:
    "Line numbers ruff reports as E501 in `path`."
    r = subprocess.run([RUFF, 'check', '--isolated', '--line-length', str(LIMIT), '--select', 'E501',
                        '--output-format', 'json', str(path)], capture_output=True, text=True)
    return [f['location']['row'] for f in json.loads(r.stdout or '[]')]


def _format_range(path:Path, first:int, last:int)->None:
    "`ruff format` lines first..last of `path` (1-based, inclusive)."
    lines = path.read_text().split('\n')
    rng = f'{first}:1-{last}:{len(lines[last - 1]) + 1}'
    subprocess.run([RUFF, 'format', *FORMAT, '--range', rng, str(path)], capture_output=True)


def format_long_lines(text:str, tmp:Path)->str:
    "Step 1: each long line formatted on its own, bottom-up, until none is left that the formatter can shorten."
    tmp.write_text(text); tried = set()
    for _ in range(500):
        lines = tmp.read_text().split('\n')
        rows = [r for r in _long_rows(tmp) if lines[r - 1] not in tried]
        if not rows: break
        before = tmp.read_text(); _format_range(tmp, rows[-1], rows[-1])
        if tmp.read_text() == before: tried.add(lines[rows[-1] - 1])
    return tmp.read_text()


def _crowded_signatures(text:str)->list[tuple[int, int]]:
    "(first, last) lines of each signature where a line with a comment holds several parameters."
    tree = ast.parse(text)
    comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT}
    out = []
    for n in ast.walk(tree):
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)): continue
        a = n.args
        per_line = {}
        for x in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
            per_line.setdefault(x.lineno, []).append(x.arg)
        if any(line in comments and len(names) > 1 for line, names in per_line.items()):
            out.append((n.lineno, n.body[0].lineno - 1))
    return out


def one_parameter_per_line(text:str, tmp:Path)->str:
    "Step 2: format each crowded signature (and only it)."
    tmp.write_text(text); tried = set()
    for _ in range(100):
        sigs = [s for s in _crowded_signatures(tmp.read_text()) if s not in tried]
        if not sigs: break
        before = tmp.read_text(); _format_range(tmp, *max(sigs))
        if tmp.read_text() == before: tried.add(max(sigs))
    return tmp.read_text()


def _split_literal(tok:str, indent:int)->tuple[str, str]|None:
    "A one-line string literal cut at the last space that fits, as two literals; None if there is none."
    m = re.match(r'([a-zA-Z]*)(["\']{1,3})', tok); prefix, quote = m.group(1), m.group(2)
    if len(quote) == 3: return None
    body, is_f, depth, cuts = tok[len(prefix) + 1:-1], 'f' in prefix.lower(), 0, []
    for i, ch in enumerate(body):
        if is_f and ch == '{': depth += 1
        elif is_f and ch == '}': depth -= 1
        elif ch == ' ' and depth == 0 and (i == 0 or body[i - 1] != '\\'): cuts.append(i + 1)
    room = LIMIT - indent - len(prefix) - 3
    fits = [c for c in cuts if 10 < c <= room]
    if not fits: return None
    cut = max(fits)
    def literal(s):
        p = prefix if not is_f or '{' in s else re.sub('[fF]', '', prefix)
        return f'{p}{quote}{s}{quote}'
    return literal(body[:cut]), literal(body[cut:])


def split_long_strings(text:str)->str:
    "Step 3: a long literal that starts its line inside brackets becomes two adjacent literals."
    lines = text.split('\n')
    while True:
        depth, changed = 0, False
        for t in tokenize.generate_tokens(io.StringIO('\n'.join(lines)).readline):
            if t.type == tokenize.OP and t.string in '([{': depth += 1
            elif t.type == tokenize.OP and t.string in ')]}': depth -= 1
            elif t.type == tokenize.STRING and depth > 0 and t.start[0] == t.end[0]:
                line = lines[t.start[0] - 1]
                if len(line) <= LIMIT or line[:t.start[1]].strip(): continue
                parts = _split_literal(t.string, t.start[1])
                if not parts: continue
                pad = ' '*t.start[1]
                lines[t.start[0] - 1:t.start[0]] = [pad + parts[0], pad + parts[1] + line[t.end[1]:]]
                changed = True; break
        if not changed: return '\n'.join(lines)


def _code_and_comment(line:str)->tuple[str, str|None]:
    "A line's code and its comment (None if none)."
    try:
        for t in tokenize.generate_tokens(io.StringIO(line + '\n').readline):
            if t.type == tokenize.COMMENT: return line[:t.start[1]].rstrip(), t.string[1:].strip()
    except (tokenize.TokenError, IndentationError): pass
    return line.rstrip(), None


def comments_above(text:str)->str:
    "Step 4: `x = (\\n v  # why\\n)` and `f(\\n args\\n)  # why` back on one line, the comment on the line above."
    lines, j = text.split('\n'), 0
    while j < len(lines) - 2:
        head = lines[j].rstrip()
        (mid, c1), (tail, c2) = _code_and_comment(lines[j + 1]), _code_and_comment(lines[j + 2])
        one_comment = bool(c1) != bool(c2)
        if head.endswith('(') and tail.strip() == ')' and one_comment and not mid.rstrip().endswith(','):
            code = head[:-1] + mid.strip() if head.endswith('= (') else head + mid.strip() + ')'
            if len(code) <= LIMIT:
                pad = head[:len(head) - len(head.lstrip())]
                lines[j:j + 3] = [f'{pad}# {c1 or c2}', code]; j += 2; continue
        j += 1
    return '\n'.join(lines)


def _tree(text:str)->str|None:
    try: return ast.dump(ast.parse(text))
    except SyntaxError: return None


def wrap(text:str, tmp:Path)->str:
    "All four steps on one cell or file; the text unchanged if its syntax tree would change."
    if _tree(text) is None: return text
    new = comments_above(split_long_strings(one_parameter_per_line(format_long_lines(text, tmp), tmp)))
    if _tree(new) == _tree(text): return new
    # only an f-string part without placeholders made plain may differ: compare with every `f` prefix dropped
    plain = lambda s: _tree(s.replace('f"', '"').replace("f'", "'"))
    return new if plain(new) == plain(text) else text


def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('paths', nargs='+', type=Path)
    p.add_argument('--dry-run', action='store_true', help='report the cells that would change, write nothing')
    a = p.parse_args(argv)
    if RUFF is None: print('ruff is not installed: pip install ruff', file=sys.stderr); return 2
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)/'cell.py'
        for path in a.paths:
            if not path.exists(): print(f'{path}: no such file', file=sys.stderr); return 2
            if path.suffix == '.py':
                old = path.read_text(); new = wrap(old, tmp)
                if new != old and not a.dry_run: path.write_text(new)
                print(f'{path}: {"changed" if new != old else "unchanged"}'); continue
            nb, changed = json.loads(path.read_text()), 0
            for cell in nb['cells']:
                src = ''.join(cell['source'])
                if cell['cell_type'] != 'code' or all(len(x) <= LIMIT for x in src.split('\n')) and \
                        not (_tree(src) and _crowded_signatures(src)): continue
                new = wrap(src + '\n', tmp).removesuffix('\n')
                if new != src: cell['source'] = new.splitlines(keepends=True); changed += 1
            if changed and not a.dry_run:
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
            print(f'{path}: {changed} cell(s) changed')
    return 0


if __name__ == '__main__': sys.exit(main())
