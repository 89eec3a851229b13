"""The real local model in the loop: a llama.cpp server started by the project, asked through the real OpenAI client.

Slow (a server start and a few CPU inferences); skipped where `make local-llm` has not been run. CI runs without it."""
import json, socket

import pytest

from deepseq_nb.backends import get_backend, AnswerCache, ReplayMiss
from deepseq_nb.local_llm import server_python, LlamaServer, FEWSHOT_VERSION
from deepseq_nb.prompts import ClusterQuery

pytestmark = pytest.mark.slow

QUERIES = [ClusterQuery('0', ['MS4A1', 'CD79A', 'CD19', 'CD79B', 'BANK1'], 'PBMC'),
           ClusterQuery('1', ['CD14', 'LYZ', 'S100A8', 'S100A9', 'FCN1'], 'PBMC'),
           ClusterQuery('2', ['INS', 'IAPP', 'PCSK1', 'NPY', 'MAFA'], 'pancreas')]


@pytest.fixture(scope='module')
def server():
    if server_python() is None:
        pytest.skip('llama-cpp-python is not installed (the [local] extra): run `make local-llm` to run this test')
    with LlamaServer(threads=1) as s: yield s
    assert s.proc.poll() is not None, 'the server process is still running after stop()'


def test_round_trip_cache_and_ledger(server, tmp_path, monkeypatch):
    ledger = tmp_path/'ledger.jsonl'
    monkeypatch.setenv('DEEPSEQ_LEDGER', str(ledger))
    be = get_backend('llamacpp:gemma-3-270m', base_url=server.base_url, cache=tmp_path/'c', progress=False)
    ans = be.annotate(QUERIES)
    assert [a.cluster for a in ans] == ['0', '1', '2']
    assert ans.stats.calls == 3 and ans.stats.hits == 0 and ans.stats.cost == 0
    assert ans.stats.tokens_in > 3*100 and ans.stats.tokens_out >= 3   # few-shot prompts are long, answers short
    assert all(a.raw.strip() and a.label and '\n' not in a.raw for a in ans)   # one line each, as the stop asks
    assert all(a.latency > 0 and not a.cached for a in ans)
    rec = json.loads(ledger.read_text().splitlines()[-1])
    assert rec['backend'] == 'llamacpp:gemma-3-270m' and rec['calls'] == 3 and rec['clusters'] == 3 and rec['ok']
    # the cache holds every answer, keyed without the server's address; a rerun asks nothing
    c = AnswerCache(tmp_path/'c')
    assert len(c) == 3
    row = c._db.execute('SELECT request, raw FROM answers').fetchall()
    assert all(str(server.port) not in r[0] and '127.0.0.1' not in r[0] for r in row)
    assert all(json.loads(r[0])['fewshot'] == FEWSHOT_VERSION for r in row)
    again = get_backend(
        'llamacpp:gemma-3-270m', base_url=server.base_url, cache=tmp_path / 'c', progress=False
    ).annotate(QUERIES)
    assert again.stats.calls == 0 and again.stats.hits == 3 and [a.label for a in again] == [a.label for a in ans]


def test_replay_needs_no_server_and_misses_loudly(server, tmp_path):
    get_backend('llamacpp:gemma-3-270m', base_url=server.base_url, cache=tmp_path, progress=False).annotate(QUERIES[:1])
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); dead = s.getsockname()[1]
    rp = get_backend(
        'llamacpp:gemma-3-270m',
        base_url=f'http://127.0.0.1:{dead}/v1',
        cache=tmp_path,
        cache_mode='replay',
        progress=False,
    )
    assert rp.annotate(QUERIES[:1]).stats.hits == 1
    with pytest.raises(ReplayMiss): rp.annotate(QUERIES[1:2])

