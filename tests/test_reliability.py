"""Reliability of the `deepseq` command (issue 20): no lost file, one Ctrl-C stops, incomplete answers never cached as
final, one per-user cache, every failure a clear message, checks before work, accurate input diagnoses.

Kill and SIGINT tests run the command in a subprocess; LLM faults are injected with the loopback stand-in server
(tools/standin_server.py). No network outside loopback.
"""
import os, signal, socket, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np, pandas as pd, pytest

from standin_server import (
    Reply,
    ollama_chat,
    openai_chat,
    label_by_first_marker,
    last_user_text,
    numbered_rows,
)
from deepseq_nb.cli import main
from deepseq_nb.backends import get_backend, AnswerCache
from deepseq_nb.prompts import make_queries

ROOT = Path(__file__).resolve().parents[1]
DEEPSEQ = str(Path(sys.executable).parent/'deepseq')
TABLE = {'CD3D': 'T cell', 'MS4A1': 'B cell', 'LYZ': 'Monocyte', 'NKG7': 'NK cell', 'PPBP': 'Platelet',
         'FCER1A': 'Dendritic cell'}
answer = label_by_first_marker(TABLE)


def env(tmp_path, private_cache=True, **kw):
    "The environment of a subprocess: this worktree's package, a private cache (else the user's), no API key."
    e = {k: v for k, v in os.environ.items() if k not in ('OPENAI_API_KEY', 'OPENAI_BASE_URL', 'OLLAMA_HOST')}
    e.update(PYTHONPATH=str(ROOT), **kw)
    if private_cache: e['DEEPSEQ_CACHE'] = str(tmp_path/'cache')
    return e


def marker_csv(path, n):
    "A marker table of `n` clusters, cycling through the stand-in's known first markers."
    firsts = list(TABLE)
    pd.DataFrame({'cluster': [str(i) for i in range(n)],
                  'marker': [f'{firsts[i % len(firsts)]}, GENE{i}' for i in range(n)]}).to_csv(path, index=False)
    return path


def chat_reply(path, body):
    text = answer(last_user_text(body))
    return Reply(200, ollama_chat(text) if path == '/api/chat' else openai_chat(text))



def ollama_args(server, *extra):
    return [
        '--backend',
        'ollama:llama3.2:1b',
        '--set',
        f'annotate.ollama_host={server.url}',
        '--set',
        'annotate.timeout=5',
        *extra,
    ]


# ------------------------------------------------------------ 1. a kill while an output is overwritten loses nothing
KILLER = textwrap.dedent("""
    import os, signal, sys, anndata, pandas
    def die_halfway(self, path, *a, **k):   # write a few bytes where the output goes, then get killed
        with open(path, 'wb') as f: f.write(b'half-written'); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    anndata.AnnData.write_h5ad = die_halfway
    pandas.DataFrame.to_csv = die_halfway
    from deepseq_nb.cli import main
    sys.exit(main(sys.argv[1:]))
""")

@pytest.mark.parametrize('cmd', ['qc', 'annotate', 'benchmark'])
def test_kill_during_overwrite_keeps_the_old_file(tmp_path, cmd):
    out = tmp_path/('old.h5ad' if cmd == 'qc' else 'old.csv')
    out.write_bytes(b'the good file from an earlier run')
    if cmd == 'qc':
        args = ['qc', 'tenx_toy_raw', '--strategy', 'knee', '--out', out, '-q']
    elif cmd == 'annotate':
        args = ['annotate', marker_csv(tmp_path / 'm.csv', 3), '--markers', '--backend', 'kb', '--out', out, '-q']
    else:
        pd.DataFrame({'tissue': ['PBMC'], 'marker': ['MS4A1, CD79A'], 'manual_annotation': ['B cell']}).to_csv(
            tmp_path / 'b.csv', index=False
        )
        args = ['benchmark', tmp_path/'b.csv', '--out', out, '-q']
    r = subprocess.run(
        [sys.executable, '-c', KILLER, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(tmp_path, private_cache=False),
        timeout=120,
    )  # the kb's parsed marker tables: the user's cache
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert out.read_bytes() == b'the good file from an earlier run'


def test_atomic_outputs_replace_the_file(tmp_path):
    out = tmp_path/'q.h5ad'; out.write_bytes(b'old')
    assert main(['qc', 'tenx_toy_raw', '--strategy', 'knee', '--out', str(out), '-q']) == 0
    import anndata as ad
    assert ad.read_h5ad(out).obs['qc_pass'].sum() == 62 and sorted(p.name for p in tmp_path.iterdir()) == ['q.h5ad']


# ---------------------------------------------------------------- 2. one Ctrl-C stops an LLM run
def test_one_sigint_stops_the_run_and_a_rerun_resumes(tmp_path, server):
    server.script, server.latency = chat_reply, 0.4
    csv, out, n = marker_csv(tmp_path/'m.csv', 12), tmp_path/'labels.csv', 12
    cmd = [DEEPSEQ, 'annotate', str(csv), '--markers', *ollama_args(server), '--set', 'annotate.batch_size=1',
           '--set', 'annotate.concurrency=1', '--out', str(out)]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path), cwd=tmp_path
    )
    t_end = time.monotonic() + 90
    while len(server.calls('/api/chat')) < 3 and time.monotonic() < t_end and p.poll() is None: time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT); t0 = time.monotonic()
    _, err = p.communicate(timeout=30)
    stopped_in = time.monotonic() - t0
    time.sleep(1.0)
    sent = len(server.calls('/api/chat'))
    assert p.returncode == 130, err[-2000:]
    assert stopped_in < 3 and sent <= 4            # nothing is sent after the Ctrl-C but the request already in flight
    assert 'Traceback' not in err and 'Rerun the same command to resume' in err and 'interrupted' in err
    assert not out.exists() and not list(tmp_path.glob('.labels.csv*'))   # nothing half-done
    cached = len(AnswerCache(tmp_path/'cache'/'llm'))
    assert 2 <= cached <= sent
    server.latency = 0.0
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(tmp_path), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(server.calls('/api/chat')) - sent == n - cached   # the rerun asks only what was not cached
    assert pd.read_csv(out)['label'].tolist()[:3] == ['T cell', 'B cell', 'Monocyte']


# ---------------------------------------------------------------- 3. an incomplete answer is not cached as final
QS = make_queries({'0': ['CD3D', 'IL7R'], '1': ['MS4A1', 'CD79A'], '2': ['LYZ', 'CD14'], '3': ['NKG7', 'GNLY']},
                  tissue='PBMC', species='human')

def drop_lines_with(gene):
    "A broken model: answers every row except those whose markers contain `gene`."
    def script(path, body):
        p = last_user_text(body); rows = numbered_rows(p)
        text = '\n'.join(
            f"{i}. {TABLE.get(r.split(',')[0].strip(), 'x')}" for i, r in enumerate(rows, 1) if gene not in r
        )
        return Reply(200, ollama_chat(text))
    return script

def test_partial_answer_is_asked_again_after_the_server_is_fixed(tmp_path, server):
    mk = lambda: get_backend('ollama:llama3.2:1b', host=server.url, cache=tmp_path/'c', progress=False, backoff=0.01)
    server.script = drop_lines_with('LYZ')
    res = mk().annotate(QS)
    assert [a.label for a in res] == ['T cell', 'B cell', 'Unknown', 'NK cell']
    assert [a.missing for a in res] == [False, False, True, False] and res.stats.missing == 1
    assert 'without an answer' in res.stats.summary()
    first = len(server.calls('/api/chat'))
    assert first == 2                              # the prompt, then one re-ask of the missing row
    server.script = chat_reply                     # the server is fixed
    res = mk().annotate(QS)
    assert len(server.calls('/api/chat')) - first == 1   # only the missing row is asked again
    assert [a.label for a in res] == ['T cell', 'B cell', 'Monocyte', 'NK cell'] and res.stats.missing == 0
    res = mk().annotate(QS)                        # now complete: a rerun is free
    assert len(server.calls('/api/chat')) - first == 1 and res.stats.hits == 2


def test_benchmark_counts_rows_without_an_answer(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setenv('DEEPSEQ_CACHE', str(tmp_path/'cache'))
    server.script = drop_lines_with('LYZ')
    pd.DataFrame({'tissue': 'PBMC', 'marker': ['CD3D, IL7R', 'MS4A1, CD79A', 'LYZ, CD14'],
                  'manual_annotation': ['T cell', 'B cell', 'monocyte']}).to_csv(tmp_path/'b.csv', index=False)
    assert main(['benchmark', str(tmp_path/'b.csv'), *ollama_args(server), '-q']) == 0
    out = capsys.readouterr().out
    head, row = (l.split() for l in out.splitlines()[:2])
    assert dict(zip(head, row))['n_no_prediction'] == '1', out
    assert 'no answer from the model: 1' in out and '1 clusters without an answer' in out


# ---------------------------------------------------------------- 4. one per-user cache, whatever the working directory
def test_cache_is_per_user_not_per_directory(tmp_path, server, monkeypatch, capsys):
    monkeypatch.delenv('DEEPSEQ_CACHE', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path/'xdg'))
    server.script = chat_reply
    csv = marker_csv(tmp_path/'m.csv', 3)
    for d in ('a', 'b'):
        (tmp_path/d).mkdir(); monkeypatch.chdir(tmp_path/d)
        assert main(['annotate', str(csv), '--markers', *ollama_args(server), '-q']) == 0
    assert len(server.calls('/api/chat')) == 1     # the run from b was answered from the cache the run from a filled
    assert (tmp_path/'xdg'/'deepseq_nb'/'llm'/'answers.sqlite').exists()
    assert not (tmp_path/'a'/'.deepseq_cache').exists()
    monkeypatch.setenv('DEEPSEQ_CACHE', str(tmp_path/'mine'))
    assert main(['annotate', str(csv), '--markers', *ollama_args(server), '-q']) == 0
    assert len(AnswerCache(tmp_path/'mine'/'llm')) == 1
    from deepseq_nb.knowledge import cache_dir
    assert cache_dir() == tmp_path/'mine'          # the knowledge base shares it


def test_corrupt_cache_names_the_file(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv('DEEPSEQ_CACHE', str(tmp_path/'cache'))
    bad = tmp_path/'cache'/'llm'/'answers.sqlite'; bad.parent.mkdir(parents=True); bad.write_text('not a database')
    assert main(['annotate', str(marker_csv(tmp_path/'m.csv', 2)), '--markers', *ollama_args(server), '-q']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and 'move it aside' in err[0] and not server.calls('/api/chat')


# ---------------------------------------------------------------- 5. every expected failure: one or two lines, exit 2
def closed_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def one_error(capsys, argv, code=2):
    rc = main(argv); err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(('•', '  done in'))]
    assert rc == code and 1 <= len(lines) <= 2 and 'Traceback' not in err, err
    return lines[0]

def test_failures_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('DEEPSEQ_CACHE', str(tmp_path/'cache'))
    monkeypatch.delenv('OPENAI_API_KEY', raising=False); monkeypatch.delenv('OPENAI_BASE_URL', raising=False)
    csv = str(marker_csv(tmp_path/'m.csv', 2))
    msg = one_error(capsys, ['annotate', csv, '--markers', '--backend', 'openai:gpt-4o', '-q'])
    assert 'OPENAI_API_KEY is not set' in msg                                 # BackendError (MissingKey)
    msg = one_error(capsys, ['annotate', csv, '--markers', '--backend', 'ollama:m?foo=1', '-q'])
    assert 'takes no option(s) foo' in msg                                    # TypeError
    url = f'http://127.0.0.1:{closed_port()}/v1'
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test-not-a-key')
    monkeypatch.setenv('OPENAI_BASE_URL', url)
    msg = one_error(
        capsys, ['annotate', csv, '--markers', '--backend', 'openai:gpt-4o', '--set', 'annotate.max_retries=0', '-q']
    )
    assert url in msg and 'Cannot reach' in msg                               # a closed base URL is named
    assert 'sk-test-not-a-key' not in msg
    msg = one_error(capsys, ['qc', 'tenx_toy_raw', '--out', '/proc/x.h5ad', '-q'])  # OSError
    assert '/proc' in msg
    rc = main(
        ['--debug', 'cluster', 'tenx_toy_raw', '--out', str(tmp_path / 'x.h5ad'), '--set', 'cluster.resolution=abc']
    )
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' in err and 'cluster.resolution' in err  # --debug shows the traceback


def test_malformed_json_answer_is_retried(tmp_path, server, monkeypatch):
    server.script = chat_reply
    be = get_backend('ollama:llama3.2:1b', host=server.url, cache=tmp_path/'c', progress=False, backoff=0.01)
    be.connect()                                   # the model list; then the two bad answers go to the chat
    server.queue = [Reply(200, 'this is not JSON {'), Reply(200, {'message': 5})]   # not JSON; JSON of the wrong shape
    res = be.annotate(QS)
    assert [a.label for a in res] == ['T cell', 'B cell', 'Monocyte', 'NK cell'] and len(server.calls('/api/chat')) == 3
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    server.queue = [Reply(200, 'garbage')] * 2
    be = get_backend('openai:m', base_url=server.url + '/v1', cache=None, progress=False, backoff=0.01, max_retries=1)
    with pytest.raises(Exception, match='malformed body'): be.annotate(QS)


# ---------------------------------------------------------------- 6. checks before work
@pytest.mark.parametrize(
    'argv, want',
    [
        (
            ['cluster', 'tenx_toy_filtered', '--out', 'OUT', '--set', 'cluster.resolution=abc'],
            'cluster.resolution must be a number',
        ),
        (['annotate', 'tenx_toy_filtered', '--set', 'annotate.timeout=abc'], 'annotate.timeout must be a number'),
        (['annotate', 'tenx_toy_filtered', '--backend', 'olama:llama3'], "Unknown backend 'olama:llama3'"),
        (['cluster', 'tenx_toy_filtered', '--out', 'NODIR/x.h5ad'], 'does not exist'),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, capsys, argv, want):
    argv = [a.replace('OUT', str(tmp_path/'x.h5ad')).replace('NODIR', str(tmp_path/'nodir')) for a in argv]
    t0 = time.monotonic()
    msg = one_error(capsys, argv)
    assert want in msg and time.monotonic() - t0 < 2, msg
    assert 'loading' not in capsys.readouterr().err


def test_one_cluster_is_a_clear_error():
    import anndata as ad, scipy.sparse as sp
    from deepseq_nb.cluster import top_markers
    a = ad.AnnData(sp.csr_matrix(np.random.default_rng(0).poisson(1, (5, 20)).astype(np.float32)),
                   obs=pd.DataFrame({'leiden': pd.Categorical(['0'] * 5)}, index=[f'c{i}' for i in range(5)]))
    a.var_names = [f'G{i}' for i in range(20)]
    with pytest.raises(ValueError, match='at least 2 groups'): top_markers(a)   # was ZeroDivisionError


# ---------------------------------------------------------------- 7. accurate input diagnoses
@pytest.fixture
def toy_table():
    from deepseq_nb.data import load_dataset
    a = load_dataset('tenx_toy_filtered')
    return pd.DataFrame(a.X.toarray(), index=a.obs_names, columns=a.var_names)

def test_nan_and_negative_values_are_named(tmp_path, capsys, toy_table):
    d = toy_table.copy(); d.iloc[0, 0] = np.nan; d.to_csv(tmp_path/'nan.csv')
    msg = one_error(capsys, ['qc', str(tmp_path/'nan.csv'), '-q'])
    assert 'NaN' in msg and 'log-normalised' not in msg
    d = toy_table.copy(); d.iloc[0, 0] = -3; d.to_csv(tmp_path/'neg.csv')
    msg = one_error(capsys, ['qc', str(tmp_path/'neg.csv'), '-q'])
    assert 'negative' in msg and 'log-normalised or scaled' not in msg

def test_qc_on_lognorm_gives_advice_that_works(capsys):
    msg = one_error(capsys, ['qc', 'pancreas_xin', '-q'])
    assert 'log-normalised' in msg and 'x_is=lognorm' not in msg and 'deepseq cluster pancreas_xin' in msg
    msg = one_error(capsys, ['qc', 'pancreas_xin', '--set', 'data.x_is=lognorm', '-q'])
    assert 'x_is=lognorm' not in msg           # the advice never leads back to the same error

def test_genes_in_rows_and_encoding_from_the_cli(tmp_path, capsys, toy_table):
    toy_table.T.to_csv(tmp_path/'g.csv')
    msg = one_error(capsys, ['qc', str(tmp_path/'g.csv'), '-q'])
    assert '--orientation genes_x_cells' in msg
    assert main(['qc', str(tmp_path/'g.csv'), '--orientation', 'genes_x_cells', '--strategy', 'knee', '-q']) == 0
    assert 'kept:' in capsys.readouterr().out
    toy_table.rename(index=lambda c: c + 'é').to_csv(tmp_path/'l.csv', encoding='latin-1')
    msg = one_error(capsys, ['qc', str(tmp_path/'l.csv'), '-q'])
    assert 'l.csv' in msg and '--encoding' in msg
    assert main(['qc', str(tmp_path/'l.csv'), '--encoding', 'latin-1', '--strategy', 'knee', '-q']) == 0
