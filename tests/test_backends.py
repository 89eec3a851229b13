"""The Ollama and OpenAI backends through the real clients, against a loopback stand-in server
(tools/standin_server.py).

Covers: the prompt that reaches the server; messy answers and re-asking missing rows; tool-call round trips (Ollama
tools, OpenAI web_search output items); 429 with Retry-After, 500s, answers slower than the timeout; a crash after
N of M calls and a rerun that asks only M-N; a cached rerun with zero requests; replay-only failing on a miss; the
API key absent from every file written; clear errors; consensus.
"""
import json, logging

import pytest

from standin_server import (Reply, ollama_chat, openai_chat, openai_response, label_by_first_marker, last_user_text,
                            numbered_rows)
from deepseq_nb.prompts import make_queries, batch_prompt, cluster_prompt
from deepseq_nb.backends import (get_backend, AnswerCache, BackendError, BackendUnavailable, ModelNotFound, MissingKey,
                                 ReplayMiss, ContextTooLong)

TABLE = {'CD3D': 'CD4+ T cell', 'MS4A1': 'B cell', 'LYZ': 'CD14+ monocyte', 'NKG7': 'NK cell', 'PPBP': 'Platelet',
         'FCER1A': 'Dendritic cell'}
MARKERS = {'0': ['CD3D', 'IL7R'], '1': ['MS4A1', 'CD79A'], '2': ['LYZ', 'CD14'], '3': ['NKG7', 'GNLY'],
           '4': ['PPBP', 'PF4'], '5': ['FCER1A', 'CST3']}
EXPECTED = [TABLE[m[0]] for m in MARKERS.values()]
QS = make_queries(MARKERS, tissue='PBMC', species='human')
answer = label_by_first_marker(TABLE)


STANDIN_MODELS = ['llama3.2:1b', 'qwen2.5:7b']   # served by the `server` fixture of conftest.py


def scripted(path, body):
    "Answer every chat route from the markers in the prompt."
    text = answer(last_user_text(body))
    if path == '/api/chat': return Reply(200, ollama_chat(text))
    if path == '/v1/chat/completions': return Reply(200, openai_chat(text))
    if path == '/v1/responses': return Reply(200, openai_response(text))
    return Reply(404, {'error': 'unknown route'})


def ollama(server, tmp_path, **kw):
    kw = {'cache': tmp_path/'cache', 'progress': False, 'backoff': 0.01, 'timeout': 5, **kw}
    return get_backend('ollama:llama3.2:1b', host=server.url, **kw)


def openai_b(server, tmp_path, spec='openai:gpt-4o', **kw):
    kw = {
        'cache': tmp_path / 'cache',
        'progress': False,
        'backoff': 0.01,
        'timeout': 5,
        'base_url': server.url + '/v1',
        **kw,
    }
    return get_backend(spec, **kw)


def test_prompt_reaches_server(server, tmp_path, monkeypatch):
    server.script = scripted
    res = ollama(server, tmp_path, batch_size=30, seed=7).annotate(QS)
    chats = server.calls('/api/chat')
    assert len(chats) == 1
    body = chats[0]['body']
    assert body['messages'] == [{'role': 'user', 'content': batch_prompt(QS)}]
    assert (
        body['options'] == {'temperature': 0.0, 'seed': 7}
        and body['model'] == 'llama3.2:1b'
        and body['stream'] is False
    )
    assert [a.label for a in res] == EXPECTED and [a.cluster for a in res] == list(MARKERS)
    assert sum(a.tokens_in for a in res) == pytest.approx(11) and res.stats.calls == 1
    # per-cluster mode through OpenAI chat completions: one request per cluster, each with its own prompt
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    res = openai_b(server, tmp_path, batch_size=1, seed=3).annotate(QS[:2])
    bodies = [c['body'] for c in server.calls('/v1/chat/completions')]
    assert [b['messages'][0]['content'] for b in bodies] == [cluster_prompt(q) for q in QS[:2]]
    assert all(b['seed'] == 3 and b['temperature'] == 0.0 for b in bodies)
    assert [a.label for a in res] == EXPECTED[:2]


def test_messy_answer_and_reask(server, tmp_path):
    messy = ("Sure! Here are the annotations:\n```\n**1.** CD4+ T cell (CD3D, IL7R)\n2) B cell - MS4A1\n"
             "- 4: NK cell\n5. Platelet\n6. Dendritic cell\n```\nHope this helps!")
    def script(path, body):
        p = last_user_text(body)
        return Reply(200, ollama_chat(messy if len(numbered_rows(p)) == 6 else answer(p)))
    server.script = script
    res = ollama(server, tmp_path).annotate(QS)
    chats = server.calls('/api/chat')
    assert len(chats) == 2 and res.stats.reasks == 1
    reask = chats[1]['body']['messages'][0]['content']
    assert 'LYZ, CD14' in reask and 'CD3D' not in reask and 'NKG7' not in reask   # only row 3 is re-asked
    assert [a.label for a in res] == EXPECTED


def test_unparseable_rows_become_unknown(server, tmp_path):
    server.script = lambda p, b: Reply(200, ollama_chat('1. CD4+ T cell' if len(numbered_rows(last_user_text(b))) == 3
                                                        else 'No idea, sorry.'))
    res = ollama(server, tmp_path, max_reasks=1).annotate(QS[:3])
    assert [a.label for a in res] == ['CD4+ T cell', 'Unknown', 'Unknown'] and len(server.calls('/api/chat')) == 2


def test_ollama_tool_round_trip(server, tmp_path):
    seen = []
    def retrieve(genes, tissue=None, species='human', k=5):
        seen.append((genes, tissue, species, k))
        return [{'cell_type': 'B cell', 'cl_id': 'CL:0000236', 'score': 0.9, 'source': 'PanglaoDB'}]
    def script(path, body):
        if not any(m['role'] == 'tool' for m in body['messages']):
            return Reply(200, ollama_chat('', tool_calls=[('retrieve', {'genes': ['MS4A1', 'CD79A']})]))
        return Reply(200, ollama_chat('1. B cell'))
    server.script = script
    b = ollama(server, tmp_path, search=True, retrieve=retrieve)
    res = b.annotate(QS[1:2])
    chats = server.calls('/api/chat')
    assert len(chats) == 2 and res.stats.calls == 2
    assert chats[0]['body']['tools'][0]['function']['name'] == 'retrieve'
    tool_msg = [m for m in chats[1]['body']['messages'] if m['role'] == 'tool'][0]
    assert tool_msg['tool_name'] == 'retrieve' and json.loads(tool_msg['content'])[0]['cl_id'] == 'CL:0000236'
    assert chats[1]['body']['messages'][1]['tool_calls'][0]['function']['arguments'] == {'genes': ['MS4A1', 'CD79A']}
    assert seen == [(['MS4A1', 'CD79A'], 'PBMC', 'human', 5)]
    assert res[0].label == 'B cell' and res[0].sources[0]['source'] == 'PanglaoDB'
    assert res[0].tokens_in == 22 and res[0].tokens_out == 14   # two requests' tokens


def test_ollama_tool_loop_is_bounded(server, tmp_path):
    def script(path, body):
        if body.get('tools'): return Reply(200, ollama_chat('', tool_calls=[('retrieve', {'genes': ['CD3D']})]))
        return Reply(200, ollama_chat('1. CD4+ T cell'))
    server.script = script
    res = ollama(server, tmp_path, search=True, max_steps=3, retrieve=lambda g, **k: []).annotate(QS[:1])
    chats = server.calls('/api/chat')
    assert (
        len(chats) == 4
        and not chats[-1]['body'].get('tools')
        and chats[0]['body']['tools']
        and res[0].label == 'CD4+ T cell'
    )


def test_openai_web_search_round_trip(server, tmp_path, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    def script(path, body):
        return Reply(200, openai_response(answer(last_user_text(body)), input_tokens=1000, output_tokens=100,
                                          citations=[('https://panglaodb.se/markers', 'PanglaoDB'),
                                                     ('https://www.ebi.ac.uk/ols/cl', 'Cell Ontology')],
                                          searches=['MS4A1 CD79A cell type']))
    server.script = script
    b = openai_b(server, tmp_path, spec='openai:gpt-4o?web_search=true',
                 prices={'gpt-4o': (2.5, 10.0), 'web_search_call': 0.01})
    res = b.annotate(QS)
    reqs = server.calls('/v1/responses')
    assert len(reqs) == 1 and reqs[0]['body']['tools'] == [{'type': 'web_search'}]
    assert reqs[0]['body']['input'] == batch_prompt(QS) and reqs[0]['body']['model'] == 'gpt-4o'
    assert [a.label for a in res] == EXPECTED
    urls = [s['url'] for s in res[0].sources if s['type'] == 'url']
    assert urls == ['https://panglaodb.se/markers', 'https://www.ebi.ac.uk/ols/cl']
    assert {'type': 'search', 'query': 'MS4A1 CD79A cell type'} in res[0].sources
    assert res.stats.cost == pytest.approx(1000*2.5/1e6 + 100*10/1e6 + 0.01)
    assert sum(a.cost for a in res) == pytest.approx(res.stats.cost)


def test_structured_json(server, tmp_path):
    def script(path, body):
        assert body['format']['required'] == ['answers']
        return Reply(200, ollama_chat(json.dumps({'answers': [
            {'row': i, 'label': TABLE[r.split(',')[0]], 'confidence': 0.8, 'reason': 'marker'}
            for i, r in enumerate(numbered_rows(last_user_text(body)), 1)]})))
    server.script = script
    res = ollama(server, tmp_path, structured=True).annotate(QS)
    assert [a.label for a in res] == EXPECTED and all(a.confidence == 0.8 for a in res)


def test_429_retry_after_and_500s(server, tmp_path, monkeypatch):
    server.script = scripted
    waits = []
    server.queue = [Reply(429, {'error': 'rate limited'}, {'Retry-After': '0.7'}), Reply(500, {'error': 'boom'}),
                    Reply(503, {'error': 'busy'})]
    b = ollama(server, tmp_path, sleep=waits.append, backoff=0.5)
    server.queue.insert(0, Reply(200, {'models': [{'model': 'llama3.2:1b'}]}))   # the model check comes first
    res = b.annotate(QS)
    assert waits[0] == 0.7                                  # Retry-After honoured
    assert 0.5 <= waits[1] <= 1.0 and 1.0 <= waits[2] <= 2.0  # 0.5 s doubling per attempt, jitter in [50 %, 100 %]
    assert len(server.calls('/api/chat')) == 4 and res.stats.calls == 1 and [a.label for a in res] == EXPECTED
    # the same through the OpenAI client
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test'); server.reset(); waits.clear()
    server.queue = [Reply(429, {'error': {'message': 'slow down'}}, {'Retry-After': '2'}), Reply(502, 'bad gateway')]
    res = openai_b(server, tmp_path, sleep=waits.append).annotate(QS)
    assert waits[0] == 2.0 and len(waits) == 2 and len(server.calls('/v1/chat/completions')) == 3
    assert [a.label for a in res] == EXPECTED


def test_retries_give_up(server, tmp_path):
    server.script = lambda p, b: Reply(500, {'error': 'down'})
    waits = []
    with pytest.raises(BackendError, match='cached'):
        ollama(server, tmp_path, max_retries=2, sleep=waits.append).annotate(QS)
    assert len(server.calls('/api/chat')) == 3 and len(waits) == 2


def test_timeout(server, tmp_path):
    server.script = scripted
    server.queue = [Reply(200, {'models': [{'model': 'llama3.2:1b'}]}), Reply(200, ollama_chat('1. x'), delay=1.5)]
    res = ollama(server, tmp_path, timeout=0.4).annotate(QS)
    chats = server.calls('/api/chat')
    assert len(chats) == 2 and [a.label for a in res] == EXPECTED
    assert chats[1]['t'] - chats[0]['t'] < 1.5                  # retried before the slow answer would have come
    server.reset()
    server.script = lambda p, b: Reply(200, ollama_chat('1. x'), delay=1.0)
    with pytest.raises(BackendError, match='(?i)timeout|timed out'):
        ollama(server, tmp_path/'c2', timeout=0.3, max_retries=1).annotate(QS)


def test_crash_then_resume(server, tmp_path):
    M, N = len(QS), 4
    def crashing(path, body):
        if len(server.calls('/api/chat')) > N: return Reply(400, {'error': 'scripted crash'})
        return scripted(path, body)
    server.script = crashing
    with pytest.raises(BackendError, match=f'answers for {N} clusters'):
        ollama(server, tmp_path, batch_size=1).annotate(QS)
    assert len(AnswerCache(tmp_path/'cache')) == N
    server.reset(); server.script = scripted
    res = ollama(server, tmp_path, batch_size=1).annotate(QS)
    chats = server.calls('/api/chat')
    assert len(chats) == M - N and res.stats.hits == N and res.stats.calls == M - N
    asked = [numbered_rows(c['body']['messages'][0]['content']) or c['body']['messages'][0]['content'] for c in chats]
    assert all(any(m in str(a) for m in ('PPBP', 'FCER1A')) for a in asked)   # only the two missing clusters
    assert [a.label for a in res] == EXPECTED


def test_crash_with_concurrency_keeps_answers(server, tmp_path):
    def crashing(path, body):
        if 'NKG7' in last_user_text(body): return Reply(400, {'error': 'scripted crash'})
        return scripted(path, body)
    server.script = crashing
    with pytest.raises(BackendError):
        ollama(server, tmp_path, batch_size=1, concurrency=3).annotate(QS)
    n = len(AnswerCache(tmp_path/'cache'))
    assert n >= 3 and n == len(server.calls('/api/chat')) - 1   # every answer received was stored


def test_cached_rerun_makes_zero_requests(server, tmp_path):
    server.script = scripted
    first = ollama(server, tmp_path, batch_size=2, concurrency=2).annotate(QS)
    server.reset()
    again = ollama(server, tmp_path, batch_size=2, concurrency=2).annotate(QS)
    assert server.calls() == [] and again.stats.calls == 0 and again.stats.hits == 3
    assert [a.label for a in again] == [a.label for a in first] and all(a.cached for a in again)
    # refresh asks again; a new template version, seed or model would miss
    ollama(server, tmp_path, batch_size=2, cache_mode='refresh').annotate(QS)
    assert len(server.calls('/api/chat')) == 3
    server.reset()
    ollama(server, tmp_path, batch_size=2, seed=1).annotate(QS)
    assert len(server.calls('/api/chat')) == 3


def test_replay_only(server, tmp_path, monkeypatch):
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    with pytest.raises(ReplayMiss, match='replay'):
        ollama(server, tmp_path, cache_mode='replay').annotate(QS)
    assert server.calls() == []
    server.script = scripted
    ollama(server, tmp_path).annotate(QS)
    server.reset()
    res = ollama(server, tmp_path, cache_mode='replay').annotate(QS)
    assert server.calls() == [] and [a.label for a in res] == EXPECTED


def test_key_never_written(server, tmp_path, monkeypatch):
    key = 'sk-SECRET-3f9a1c77e2b04d18'
    monkeypatch.setenv('OPENAI_API_KEY', key)
    out = tmp_path/'out'; out.mkdir()
    handler = logging.FileHandler(out/'run.log'); handler.setLevel(logging.DEBUG)
    lg = logging.getLogger('deepseq_nb'); lg.addHandler(handler); old = lg.level; lg.setLevel(logging.DEBUG)
    try:
        server.script = lambda p, b: Reply(200, openai_response(answer(last_user_text(b)), [('https://x.org', 'X')]))
        server.queue = [Reply(429, {'error': {'message': 'slow'}}, {'Retry-After': '0'})]
        b = openai_b(server, out, spec='openai:gpt-4o?web_search=true')
        res = b.annotate(QS)
        server.script = scripted
        openai_b(server, out, batch_size=2).annotate(QS)
        res.to_frame().to_csv(out/'answers.csv')
        (out/'params.json').write_text(json.dumps({'params': b.params, 'stats': vars(res.stats), 'repr': repr(b)}))
    finally:
        lg.removeHandler(handler); handler.close(); lg.setLevel(old)
    auth = {c['headers'].get('authorization') for c in server.calls() if c['path'].startswith('/v1')}
    assert auth == {f'Bearer {key}'}                 # the key was really in play...
    files = [p for p in tmp_path.rglob('*') if p.is_file()]
    assert len(files) >= 4 and (out/'run.log').stat().st_size > 0
    for p in files: assert key.encode() not in p.read_bytes(), p          # ...and is in no file written
    assert key[3:].encode() not in b''.join(p.read_bytes() for p in files)


def test_clear_errors(server, tmp_path, monkeypatch):
    with pytest.raises(ModelNotFound, match=r"llama3.2:1b, qwen2.5:7b"):
        get_backend('ollama:mistral', host=server.url, cache=None, progress=False).annotate(QS)
    with pytest.raises(BackendUnavailable, match='ollama serve'):
        get_backend('ollama:llama3.2:1b', host='http://127.0.0.1:9', cache=None, progress=False,
                    backoff=0.01).annotate(QS)
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    with pytest.raises(MissingKey, match='OPENAI_API_KEY'):
        openai_b(server, tmp_path).annotate(QS)
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    server.script = lambda p, b: Reply(
        400,
        {
            'error': {
                'message': "This model's maximum context length is 8192 tokens",
                'type': 'invalid_request_error',
                'code': 'context_length_exceeded',
            }
        },
    )
    with pytest.raises(ContextTooLong, match='batch_size'):
        openai_b(server, tmp_path).annotate(QS)
    assert len(server.calls('/v1/chat/completions')) == 1   # not retried


def test_consensus(server, tmp_path, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    def script(path, body):
        text = answer(last_user_text(body))
        if path == '/api/chat' and body['model'] == 'qwen2.5:7b': text = text.replace('B cell', 'Plasma cell')
        return scripted(path, body) if path != '/api/chat' else Reply(200, ollama_chat(text))
    server.script = script
    spec = f'consensus:[ollama:llama3.2:1b?host={server.url}, ollama:qwen2.5:7b?host={server.url}, openai:gpt-4o]'
    res = get_backend(spec, cache=tmp_path/'cache', progress=False, base_url=server.url + '/v1', to_cl=False)
    out = res.annotate(QS)
    assert [a.label for a in out] == EXPECTED
    assert out[1].confidence == pytest.approx(2/3) and out[0].confidence == 1.0
    assert [v['label'] for v in out[1].sources] == ['B cell', 'Plasma cell', 'B cell']


def test_kb_backend():
    pytest.importorskip('deepseq_nb.knowledge')
    res = get_backend('kb').annotate(QS)
    assert [a.cluster for a in res] == list(MARKERS) and all(a.backend == 'kb' and a.cost == 0 for a in res)
    assert all(a.label for a in res) and res.stats.calls == 0


def test_kb_backend_interface():
    "The kb wrapper against a scripted annotator with the knowledge module's interface."
    import pandas as pd
    def kb_annotate(markers, tissue=None, species='human', top=3):
        return pd.DataFrame(
            [
                {
                    'cell_type': TABLE.get(markers[0], 'Unknown'),
                    'cl_id': 'CL:x',
                    'cl_name': 'x',
                    'score': 1.0,
                    'confidence': 0.75,
                    'evidence': f'{markers[0]} matched',
                    'source': 'PanglaoDB',
                }
            ]
        )
    res = get_backend('kb', kb_annotate=kb_annotate).annotate(QS)
    assert (
        [a.label for a in res] == EXPECTED
        and res[0].confidence == 0.75
        and res[0].sources == [{'type': 'kb', 'source': 'PanglaoDB', 'cl_id': 'CL:x'}]
    )
    assert res[2].reason == 'LYZ matched'
