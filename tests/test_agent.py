"""The agent (deepseq_nb.agent): action schemas and validation, the offline planner on many phrasings (plans and
refusals), offline sessions with real results, consent, and LLM tool-calling sessions through the real ollama and openai
clients against the loopback stand-in server (tools/standin_server.py): multi-step, repaired arguments, an unknown tool
refused, the step bound, consent, dry run, and a session resumed from the cache after a failure. No network.
"""
import argparse, json
from pathlib import Path

import numpy as np
import pytest

from standin_server import StandinServer, Reply, ollama_chat
from deepseq_nb.agent import (
    ACTIONS,
    AgentError,
    AgentState,
    ArgumentError,
    add_agent_parser,
    agent,
    cmd_agent,
    plan_offline,
    run_step,
    validate_args,
)
from deepseq_nb.backends import AnswerCache
from deepseq_nb.config import load_settings


@pytest.fixture(scope='module')
def settings(tmp_path_factory):
    d = tmp_path_factory.mktemp('agent')
    return load_settings(overrides={'agent.plot_dir': str(d/'plots'), 'plugins.epochs': 2, 'incremental.epochs': 3,
                                    'agent.max_cells': 300})


@pytest.fixture(scope='module')
def clustered(settings):
    """300 pbmc3k cells, QC'd, log-normalised, with markers: the start of most sessions. The clusters are the Seurat
    tutorial's (obs seurat_cluster) in place of Leiden: the neighbour graph's numba compilation alone takes ~20 s; the
    notebook runs `cluster`."""
    from deepseq_nb.cluster import normalize
    st = AgentState(settings=settings)
    for name, args in [('load_data', {'dataset': 'pbmc3k'}), ('qc', {})]:
        r = run_step(st, name, args, yes=True)
        assert r['status'] == 'ok', r
    assert r['result']['of'] == 300 and r['result']['kept'] == st.adata.n_obs
    normalize(st.adata)
    n = st.adata.obs['seurat_cluster'].astype(str).value_counts()
    st.adata = st.adata[
        st.adata.obs['seurat_cluster'].astype(str).isin(n.index[n >= 5]).to_numpy()
    ].copy()  # groups of >= 5 cells
    st.adata.obs['leiden'] = st.adata.obs['seurat_cluster'].astype(str).astype('category')
    r = run_step(st, 'markers', {})
    assert r['status'] == 'ok' and set(r['result']['top']) == set(st.adata.obs['leiden'])
    return st


def fresh(clustered, **kw):
    "A new state on a copy of the clustered cells."
    return AgentState(adata=clustered.adata.copy(), settings=clustered.settings, **kw)


def majority_truth(a):
    return (
        a.obs.groupby('leiden', observed=True)['cell_type']
        .agg(lambda s: s.value_counts().index[0])
        .astype(str)
        .to_dict()
    )


# --- actions: schemas and validation ---------------------------------------------------------------------------------

def test_schemas_come_from_signatures_and_docs():
    p = ACTIONS['add_cell_type'].parameters
    assert p['required'] == ['name', 'clusters']
    assert p['properties']['clusters']['type'] == 'array' and p['properties']['clusters']['items'] == {'type': 'string'}
    assert p['properties']['name']['description'] == "the new cell type's name"
    assert p['properties']['epochs'] == {
        'type': 'integer',
        'nullable': True,
        'description': p['properties']['epochs']['description'],
        'default': None,
    }
    assert ACTIONS['plot'].parameters['properties']['kind']['enum'] == ['umap', 'markers', 'novelty', 'confusion']
    tool = ACTIONS['annotate'].tool
    assert (
        tool['type'] == 'function'
        and tool['function']['name'] == 'annotate'
        and 'backend' in tool['function']['parameters']['properties']
    )
    assert (
        bool(ACTIONS['add_cell_type'].consent)
        and bool(ACTIONS['train_plugin'].consent)
        and not ACTIONS['annotate'].consent
    )


def test_validation_repairs_and_rejects():
    a = ACTIONS['add_cell_type']
    assert validate_args(a, '{"name": "Platelet", "clusters": 5}')['clusters'] == ['5']
    assert validate_args(a, {'name': 'X', 'clusters': '1, 2', 'epochs': '3'})['epochs'] == 3
    with pytest.raises(ArgumentError, match="unknown argument 'cells'; missing required argument 'clusters'"):
        validate_args(a, {'name': 'X', 'cells': [1]})
    with pytest.raises(ArgumentError, match='resolution must be a number'):
        validate_args(ACTIONS['cluster'], {'resolution': 'high'})
    with pytest.raises(ArgumentError, match="kind must be one of"): validate_args(ACTIONS['plot'], {'kind': 'heatmap'})
    with pytest.raises(ArgumentError, match='not valid JSON'): validate_args(ACTIONS['qc'], '{"strategy": ')


# --- the offline planner ----------------------------------------------------------------------------------------------

PIPE = ['load_data', 'qc', 'cluster', 'markers']
PHRASINGS = [
    ('annotate pbmc3k', PIPE + ['annotate'], {'load_data': {'dataset': 'pbmc3k'}}),
    ('Annotate this PBMC data please', PIPE + ['annotate'], {'load_data': {'dataset': 'pbmc3k'}}),
    ('what cell types are in pancreas_xin?', PIPE + ['annotate'], {'load_data': {'dataset': 'pancreas_xin'}}),
    ('label the clusters of pbmc 3k with gpt-4o', PIPE + ['annotate'], {'annotate': {'backend': 'openai:gpt-4o'}}),
    (
        'identify the cells in pbmc3k using ollama:llama3.2:1b',
        PIPE + ['annotate'],
        {'annotate': {'backend': 'ollama:llama3.2:1b'}},
    ),
    ('which clusters look novel?', PIPE + ['build_reference', 'assess_novelty'], {}),
    (
        'annotate pbmc3k and tell me which clusters look novel',
        PIPE + ['annotate', 'build_reference', 'assess_novelty'],
        {},
    ),
    (
        'are there unknown cell types in 500 cells of pbmc3k, holding out NK cells?',
        PIPE + ['build_reference', 'assess_novelty'],
        {'load_data': {'dataset': 'pbmc3k', 'max_cells': 500}, 'build_reference': {'hold_out': ['NK cells']}},
    ),
    (
        'add a cell type called Platelet from cells in cluster 3',
        ['load_data', 'qc', 'cluster', 'train_plugin', 'add_cell_type'],
        {'add_cell_type': {'name': 'Platelet', 'clusters': ['3']}},
    ),
    (
        'learn a new type named "plasma cell" from clusters 4 and 7',
        ['load_data', 'qc', 'cluster', 'train_plugin', 'add_cell_type'],
        {'add_cell_type': {'name': 'plasma cell', 'clusters': ['4', '7']}},
    ),
    ('compare backends on this dataset', PIPE + ['compare_backends'], {'compare_backends': {}}),
    (
        'compare kb and ollama:llama3.2:1b on pbmc3k',
        PIPE + ['compare_backends'],
        {'compare_backends': {'backends': ['kb', 'ollama:llama3.2:1b']}},
    ),
    ('how accurate is the annotation against the ground truth?', PIPE + ['annotate', 'evaluate'], {}),
    (
        'run QC with the smoothed knee on tenx_toy_raw',
        ['load_data', 'qc'],
        {'load_data': {'dataset': 'tenx_toy_raw'}, 'qc': {'strategy': 'smoothed_knee'}},
    ),
    ('filter cells with at least 300 genes', ['load_data', 'qc'], {'qc': {'strategy': 'threshold', 'min_genes': 300}}),
    ('cluster pbmc3k at resolution 0.5', ['load_data', 'qc', 'cluster'], {'cluster': {'resolution': 0.5}}),
    ('show me the top marker genes of each cluster', PIPE, {}),
    ('embed pbmc3k with scGPT', ['load_data', 'embed'], {}),
    ('route the cells to the tissue plugins', ['load_data', 'train_plugin', 'route'], {}),
    (
        'plot a UMAP of the cell types of pbmc3k',
        PIPE + ['annotate', 'plot'],
        {'plot': {'kind': 'umap', 'color': 'deepseq_label'}},
    ),
    (
        'plot the novelty scores of pbmc3k',
        PIPE + ['build_reference', 'assess_novelty', 'plot'],
        {'plot': {'kind': 'novelty'}},
    ),
]
REFUSALS = [
    ('download GSE149689 from GEO and annotate it', 'do not download'),
    ('delete all the files in the results folder', 'do not delete'),
    ('what is the weather in Paris?', 'did not recognise'),
    ('write me a poem about T cells', 'did not recognise'),
    ('', 'did not recognise'),
    ('add a new cell type please', 'say its name and the clusters'),
    ('add a cell type called Platelet', 'say its name and the clusters'),
    ('annotate /no/such/file.h5ad', 'No file or directory'),
    ('upload the annotation to my server', 'do not send or upload'),
]


@pytest.mark.parametrize('request_,actions,args', PHRASINGS, ids=[p[0][:40] for p in PHRASINGS])
def test_offline_plans(request_, actions, args, settings):
    P = plan_offline(request_, AgentState(settings=settings))
    assert not P.refusal and [s.action for s in P.steps] == actions
    got = {s.action: s.args for s in P.steps}
    for a, v in args.items(): assert got[a] == v, (a, got[a])


@pytest.mark.parametrize('request_,why', REFUSALS, ids=[r[0][:40] or 'empty' for r in REFUSALS])
def test_offline_refusals(request_, why, settings):
    P = plan_offline(request_, AgentState(settings=settings))
    assert why in P.refusal and P.steps == []
    # says what is possible
    assert ('annotate pbmc3k' in P.refusal or 'cluster 5' in P.refusal or 'bundled datasets' in P.refusal)


def test_offline_plan_skips_what_the_data_holds(clustered):
    st = fresh(clustered)
    assert [s.action for s in plan_offline('annotate this pbmc data', st).steps] == ['annotate']
    assert [s.action for s in plan_offline('add a cell type called X from cluster 2', st).steps] == [
        'train_plugin',
        'add_cell_type',
    ]
    P = plan_offline('which clusters look novel, as if the B cells were unknown', st)
    assert [s.action for s in P.steps] == ['build_reference', 'assess_novelty'] and P.steps[0].args == {
        'hold_out': ['B cells']
    }


# --- offline sessions -------------------------------------------------------------------------------------------------

def test_offline_dry_run_runs_nothing(settings, tmp_path):
    run = agent(
        'annotate pbmc3k and tell me which clusters look novel',
        settings=settings,
        dry_run=True,
        transcript=tmp_path / 't',
        verbose=False,
    )
    assert run.adata is None and {r['status'] for r in run.log} == {'planned'} and run.answer.startswith('Dry run')
    rec = json.loads((tmp_path/'t.json').read_text())
    assert [s['action'] for s in rec['plan']][-2:] == ['build_reference', 'assess_novelty'] and rec['dry_run'] is True
    assert '## Plan' in (tmp_path/'t.md').read_text()


def test_offline_session_finds_the_held_out_type(clustered, tmp_path):
    st = fresh(clustered)
    run = agent(
        'annotate this data and tell me which clusters look novel, holding out B cells',
        state=st,
        transcript=tmp_path / 's',
        verbose=False,
    )
    assert run.ok and [r['action'] for r in run.log] == ['annotate', 'build_reference', 'assess_novelty']
    a, res = run.adata, run.log[-1]['result']
    truth = majority_truth(a)
    # what it flags is the held-out type
    assert res['novel_clusters'] and all(truth[c] == 'B' for c in res['novel_clusters'])
    assert [c for c, t in truth.items() if t == 'B'] == res['novel_clusters']  # and it flags all of it
    assert run.log[1]['result']['held_out'] == ['B'] and 'B' not in run.log[1]['result']['types']
    labels = run.log[0]['result']['labels']
    assert a.obs['deepseq_label'].astype(str).to_dict() == a.obs['leiden'].astype(str).map(labels).to_dict()
    assert "[3]" in run.answer and res['novel_clusters'][0] in run.answer.splitlines()[-1]
    assert json.loads(a.uns['agent']['log'])[2]['result'] == res
    md = (tmp_path/'s.md').read_text()
    assert 'assess_novelty' in md and '## Answer' in md


def test_failed_step_stops_the_plan(clustered):
    st = fresh(clustered)
    run = agent('add a cell type called X from cells in cluster 99', state=st, yes=True, verbose=False, max_steps=1)
    assert run.refused and 'more than max_steps=1' in run.answer and st.plugins is None
    st.adata.obs = st.adata.obs.drop(columns='cell_type')
    st.adata.uns.pop('dataset')
    run = agent('how accurate are the labels against the true ones?', state=st, verbose=False)
    assert [r['status'] for r in run.log] == ['ok', 'error'] and 'no true labels' in run.log[1]['error'] and not run.ok


# --- consent ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(clustered):
    "A state with a tiny untrained encoder and a plugin trained on the labelled cells (2 epochs)."
    from deepseq_nb.encoder import make_vocab, new_encoder
    st = fresh(clustered)
    st.encoder = new_encoder(
        make_vocab(list(st.adata.var_names)), d_model=16, nlayers=1, nhead=2, d_hid=32, max_len=32, seed=0
    )
    asked = []
    r = run_step(st, 'train_plugin', {}, ask=lambda *a: asked.append(a) or True)
    assert (
        r['status'] == 'ok'
        and r['consent'] == 'given'
        and asked[0][0] == 'train_plugin'
        and 'changes the model' in asked[0][2]
    )
    assert set(r['result']['types']) == set(st.adata.obs['cell_type'].astype(str))
    return st


def test_declined_consent_changes_nothing(trained):
    from deepseq_nb.incremental import plugin_state, same_state
    st, tissue = trained, trained.tissue
    before = plugin_state(st.plugins, tissue)
    asked = []
    run = agent(
        'add a cell type called Newtype from cells in cluster 2',
        state=st,
        ask=lambda *a: asked.append(a) or False,
        verbose=False,
    )
    assert [r['status'] for r in run.log] == ['declined'] and asked[0][:2] == (
        'add_cell_type',
        {'name': 'Newtype', 'clusters': ['2'], 'groupby': 'leiden', 'tissue': None, 'epochs': None},
    )
    assert same_state(before, plugin_state(st.plugins, tissue)) and 'Newtype' not in st.plugins.heads[tissue].labels
    assert 'consent was declined [1]' in run.answer
    # with consent the type is added, in a free slot
    run = agent('add a cell type called Newtype from cells in cluster 2', state=st, yes=True, verbose=False)
    r = run.log[0]
    assert (
        r['status'] == 'ok' and r['consent'] == 'given in advance (yes)' and 'Newtype' in st.plugins.heads[tissue].known
    )
    assert r['result']['n_cells'] == int((st.adata.obs['leiden'] == '2').sum()) and not same_state(
        before, plugin_state(st.plugins, tissue)
    )
    from deepseq_nb.incremental import restore_plugin
    restore_plugin(st.plugins, tissue, before)


def test_plugin_actions_route_embed_plot(trained, tmp_path):
    st = trained
    r = run_step(st, 'route', {})
    assert r['status'] == 'ok' and r['result']['plugins'] == [st.tissue]
    assert r['result']['labels'] == {
        k: int(v) for k, v in st.adata.obs['plugin_label'].astype(str).value_counts().items()
    }
    assert set(r['result']['by_cluster']) == set(st.adata.obs['leiden'].astype(str))
    r = run_step(st, 'embed', {}, ask=lambda *a: pytest.fail('embedding with a loaded encoder must not ask'))
    assert r['status'] == 'ok' and r['result']['dims'] == 16 and st.adata.obsm['X_scgpt'].shape == (st.adata.n_obs, 16)
    r = run_step(st, 'plot', {'kind': 'umap'})
    assert r['status'] == 'error' and 'No UMAP' in r['error']
    r = run_step(st, 'plot', {'kind': 'markers', 'path': str(tmp_path/'dot.png')})
    assert (
        r['status'] == 'ok'
        and (tmp_path / 'dot.png').stat().st_size > 1000
        and st.figures[-1] == str(tmp_path / 'dot.png')
    )


# --- the LLM planner through the stand-in server ----------------------------------------------------------------------

def test_compare_backends_with_a_reachable_and_a_missing_model(clustered, tmp_path):
    from standin_server import label_by_first_marker, last_user_text
    with StandinServer(models=['llama3.2:1b']) as srv:
        table = {
            'LDHB': 'T cell',
            'IL7R': 'T cell',
            'CCR7': 'T cell',
            'CD3D': 'T cell',
            'LYZ': 'CD14+ monocyte',
            'S100A9': 'CD14+ monocyte',
            'CD79A': 'B cell',
            'MS4A1': 'B cell',
            'CD74': 'B cell',
            'NKG7': 'NK cell',
            'GNLY': 'NK cell',
            'CCL5': 'CD8+ T cell',
            'FCGR3A': 'CD16+ monocyte',
            'LST1': 'CD16+ monocyte',
        }
        answer = label_by_first_marker(table)
        srv.script = lambda p, b: Reply(200, ollama_chat(answer(last_user_text(b))))
        S = load_settings(
            overrides={
                'annotate.ollama_host': srv.url,
                'annotate.cache_dir': str(tmp_path / 'cache'),
                'annotate.max_retries': 0,
            }
        )
        st = fresh(clustered); st.settings = S
        r = run_step(st, 'compare_backends', {'backends': ['kb', 'ollama:llama3.2:1b', 'ollama:no-such-model']})
    assert r['status'] == 'ok'
    B = r['result']['backends']
    assert (
        'ModelNotFound' in B['ollama:no-such-model']['error'] and 'no-such-model' in B['ollama:no-such-model']['error']
    )
    top = st.adata.uns['markers']['table'].query('rank == 1').set_index('cluster')['gene'].to_dict()
    assert B['ollama:llama3.2:1b']['labels'] == {c: table.get(g, 'Unknown cell') for c, g in top.items()}
    assert r['result']['truth'] == majority_truth(st.adata) and 0 <= B['kb']['agreement'] <= 1
    from deepseq_nb.evaluate import agreement
    sc = [agreement(B['ollama:llama3.2:1b']['labels'][c], t, 'PBMC') for c, t in r['result']['truth'].items()]
    assert B['ollama:llama3.2:1b']['agreement'] == round(float(np.nanmean(sc)), 3)
    tab = st.adata.uns['agent_compare']
    assert (
        set(tab['backend']) == {'kb', 'ollama:llama3.2:1b', 'ollama:no-such-model'}
        and 'deepseq_label' not in st.adata.obs
    )



def tool_msgs(body):
    return [m for m in body['messages'] if m['role'] == 'tool']


def ollama_script(turns):
    "Answer the n-th chat request (n = tool results so far, per turn) from `turns`: tool-call lists or a final text."
    def script(path, body):
        n = sum(1 for m in body['messages'] if m['role'] == 'assistant')
        t = turns[min(n, len(turns) - 1)]
        return Reply(200, ollama_chat(t) if isinstance(t, str) else ollama_chat('', tool_calls=t))
    return script


def llm(planner='ollama:llama3.2:1b', **kw):
    return dict(planner=planner, verbose=False, backoff=0.01, timeout=5, **kw)


def test_llm_multi_step_session_repairs_and_refuses(server, clustered, tmp_path):
    st = fresh(clustered)
    server.script = ollama_script([
        [('markers', {'n_genes': '3'})],                                  # "3": repaired to 3
        [('annotate', {'backend': 'kb', 'resolution': 2})],               # invalid: unknown argument
        [('annotate', {'backend': 'kb'})],                                # repaired by the model
        [('delete_files', {'path': '/'})],                                # unknown tool: refused
        'The clusters are annotated [3].',
    ])
    run = agent(
        'annotate these cells',
        state=st,
        host=server.url,
        cache=tmp_path / 'cache',
        transcript=tmp_path / 'llm',
        **llm(),
    )
    chats = server.calls('/api/chat')
    assert len(chats) == 5 and [r['status'] for r in run.log] == ['ok', 'error', 'ok', 'refused']
    assert run.log[0]['args']['n_genes'] == 3 and {len(g) for g in run.log[0]['result']['top'].values()} == {3}
    err = json.loads(tool_msgs(chats[2]['body'])[-1]['content'])
    assert (
        err == {'step': 2, 'ok': False, 'status': 'error', 'error': run.log[1]['error']}
        and "unknown argument 'resolution'" in err['error']
    )
    ok = json.loads(tool_msgs(chats[3]['body'])[-1]['content'])
    assert (
        ok['ok']
        and ok['result']['labels']
        == st.adata.obs.groupby('leiden', observed=True)['deepseq_label'].first().astype(str).to_dict()
    )
    refused = json.loads(tool_msgs(chats[4]['body'])[-1]['content'])
    assert (
        refused['status'] == 'refused'
        and "unknown tool 'delete_files'" in refused['error']
        and 'annotate' in refused['error']
    )
    assert tool_msgs(chats[4]['body'])[-1]['tool_name'] == 'delete_files'
    assert {t['function']['name'] for t in chats[0]['body']['tools']} == set(ACTIONS)
    assert chats[0]['body']['messages'][1] == {'role': 'user', 'content': 'annotate these cells'}
    assert run.answer == 'The clusters are annotated [3].' and run.llm['requests'] == 5 and run.llm['cache_hits'] == 0
    rec = json.loads((tmp_path/'llm.json').read_text())
    assert [s['status'] for s in rec['steps']] == ['ok', 'error', 'ok', 'refused'] and rec[
        'planner'
    ] == 'ollama:llama3.2:1b'
    assert [s['action'] for s in rec['plan']] == ['markers', 'annotate']


def openai_tool_body(calls=(), content=None):
    "A chat.completions body with tool calls [(id, name, arguments-json)]."
    msg = {'role': 'assistant', 'content': content}
    if calls:
        msg['tool_calls'] = [
            {'id': i, 'type': 'function', 'function': {'name': n, 'arguments': a}} for i, n, a in calls
        ]
    return {'id': 'chatcmpl-1', 'object': 'chat.completion', 'created': 0, 'model': 'gpt-4o',
            'choices': [{'index': 0, 'finish_reason': 'tool_calls' if calls else 'stop', 'message': msg}],
            'usage': {'prompt_tokens': 100, 'completion_tokens': 10, 'total_tokens': 110}}


def test_openai_session_and_no_key_on_disk(server, clustered, tmp_path, monkeypatch):
    key = 'sk-test-agent-SECRET-1234'
    monkeypatch.setenv('OPENAI_API_KEY', key)
    st = fresh(clustered)
    turns = [openai_tool_body([('c1', 'annotate', '{"backend": "kb"')]),          # broken JSON: returned as an error
             openai_tool_body([('c2', 'annotate', '{"backend": "kb"}')]),
             openai_tool_body([('c3', 'evaluate', '{}')]),
             openai_tool_body(content='Accuracy is in step [2]; labels from [1].')]
    server.script = lambda p, b: Reply(200, turns[sum(1 for m in b['messages'] if m['role'] == 'assistant')])
    run = agent(
        'annotate and evaluate',
        state=st,
        base_url=server.url + '/v1',
        cache=tmp_path / 'cache',
        transcript=tmp_path / 'oa',
        prices={'gpt-4o': (2.5, 10.0)},
        **llm('openai:gpt-4o'),
    )
    bodies = [c['body'] for c in server.calls('/v1/chat/completions')]
    assert (
        len(bodies) == 4
        and [r['status'] for r in run.log] == ['error', 'ok', 'ok']
        and 'not valid JSON' in run.log[0]['error']
    )
    assert (
        bodies[1]['messages'][-1]['tool_call_id'] == 'c1' and bodies[1]['messages'][-2]['tool_calls'][0]['id'] == 'c1'
    )
    assert bodies[0]['tools'][0]['type'] == 'function' and bodies[0]['temperature'] == 0 and bodies[0]['seed'] == 0
    e = st.adata.uns['deepseq_eval']
    assert run.log[2]['result'] == {
        k: round(float(e[k]), 3) for k in ('accuracy', 'mean_agreement', 'macro_f1', 'cluster_agreement')
    } | {'truth': 'cell_type', 'pred': 'deepseq_label'}
    assert (
        e['n_cells'] == st.adata.n_obs
        and 0 < e['mean_agreement'] < 1
        and {k: e['params'][k] for k in ('truth', 'pred', 'cluster')}
        == {'truth': 'cell_type', 'pred': 'deepseq_label', 'cluster': 'leiden'}
    )
    assert run.llm['cost'] == pytest.approx(4 * (100 * 2.5 + 10 * 10) / 1e6)
    for f in [*Path(tmp_path/'cache').rglob('*'), tmp_path/'oa.json', tmp_path/'oa.md']:
        if f.is_file(): assert key.encode() not in f.read_bytes(), f


def test_step_bound(server, clustered, tmp_path):
    st = fresh(clustered)

    def script(path, body):  # always two more tool calls, unless the tools were withdrawn
        if not body.get('tools'): return Reply(200, ollama_chat('Stopped at the limit; QC was skipped [1].'))
        return Reply(200, ollama_chat('', tool_calls=[('qc', {}), ('qc', {})]))
    server.script = script
    run = agent('keep running qc', state=st, host=server.url, cache=tmp_path/'cache', max_steps=3, **llm())
    chats = server.calls('/api/chat')
    assert [r['status'] for r in run.log] == ['ok', 'ok', 'ok', 'refused'] and [r['step'] for r in run.log] == [
        1,
        2,
        3,
        4,
    ]
    assert len(chats) == 3 and chats[1]['body']['tools'] and not chats[2]['body'].get('tools')
    assert 'used all 3 steps' in chats[2]['body']['messages'][-1]['content']
    assert 'step limit of 3' in json.loads(tool_msgs(chats[2]['body'])[-1]['content'])['error']
    assert run.answer == 'Stopped at the limit; QC was skipped [1].'
    # a model that keeps calling tools after the limit gets no more steps
    server.reset(); server.script = lambda p, b: Reply(200, ollama_chat('', tool_calls=[('qc', {})]))
    run = agent('keep running qc', state=st, host=server.url, cache=tmp_path/'cache2', max_steps=2, **llm())
    assert [r['status'] for r in run.log] == ['ok', 'ok', 'refused'] and len(server.calls('/api/chat')) == 3
    assert 'no answer' in run.answer


def test_llm_consent_respected(server, trained, tmp_path):
    from deepseq_nb.incremental import plugin_state, same_state
    st = trained
    before = plugin_state(st.plugins, st.tissue)
    server.script = ollama_script(
        [[('add_cell_type', {'name': 'Odd', 'clusters': ['1']})], 'I did not add it: you declined [1].']
    )
    run = agent(
        'learn cluster 1 as a new type Odd',
        state=st,
        host=server.url,
        cache=tmp_path / 'cache',
        ask=lambda *a: False,
        **llm(),
    )
    assert [r['status'] for r in run.log] == ['declined'] and same_state(before, plugin_state(st.plugins, st.tissue))
    res = json.loads(tool_msgs(server.calls('/api/chat')[1]['body'])[-1]['content'])
    assert res['status'] == 'declined' and 'did not consent' in res['error']


def test_llm_dry_run_runs_nothing(server, clustered, tmp_path):
    st = fresh(clustered)
    server.script = ollama_script(
        [[('annotate', {'backend': 'kb'})], [('evaluate', {})], 'Plan: annotate [1], evaluate [2].']
    )
    run = agent('annotate and evaluate', state=st, host=server.url, cache=tmp_path/'cache', dry_run=True, **llm())
    assert [r['status'] for r in run.log] == ['planned', 'planned'] and [s.action for s in run.plan.steps] == [
        'annotate',
        'evaluate',
    ]
    assert 'deepseq_label' not in st.adata.obs and 'agent' not in st.adata.uns
    assert json.loads(tool_msgs(server.calls('/api/chat')[1]['body'])[0]['content'])['dry_run'] is True


def test_resume_from_cache_after_a_failure(server, clustered, tmp_path):
    turns = [[('markers', {'n_genes': 4})], [('annotate', {})], 'Done: labels in [2].']
    good = ollama_script(turns)
    def crashing(path, body):
        if sum(1 for m in body['messages'] if m['role'] == 'assistant') == 2:
            return Reply(400, {'error': 'scripted crash'})
        return good(path, body)
    server.script = crashing
    with pytest.raises(AgentError, match='rerun the same request to resume'):
        agent('annotate', state=fresh(clustered), host=server.url, cache=tmp_path/'cache', **llm())
    assert len(server.calls('/api/chat')) == 3 and len(AnswerCache(tmp_path/'cache')) == 2   # turns 1 and 2 were cached
    server.reset(); server.script = good
    st = fresh(clustered)
    run = agent('annotate', state=st, host=server.url, cache=tmp_path/'cache', **llm())
    chats = server.calls('/api/chat')
    # only the failed turn is asked again
    assert (len(chats) == 1 and run.llm['cache_hits'] == 2 and run.llm['requests'] == 1)
    assert len(tool_msgs(chats[0]['body'])) == 2 and [r['status'] for r in run.log] == ['ok', 'ok']
    assert run.answer == 'Done: labels in [2].' and 'deepseq_label' in st.adata.obs


# --- the command line -------------------------------------------------------------------------------------------------

def parse(*argv):
    P = argparse.ArgumentParser(prog='deepseq')
    add_agent_parser(P.add_subparsers(dest='command'))
    return P.parse_args(['agent', *argv])


def test_cli(tmp_path, capsys):
    args = parse('which clusters look novel', '--dataset', 'pbmc3k', '--dry-run', '--transcript', str(tmp_path/'c'),
                 '--set', 'agent.max_cells=200', '--max-steps', '6')
    assert args.func is cmd_agent and cmd_agent(args) == 0
    rec = json.loads((tmp_path/'c.json').read_text())
    assert [s['action'] for s in rec['plan']] == ['qc', 'cluster', 'markers', 'build_reference', 'assess_novelty']
    assert {s['status'] for s in rec['steps']} == {'planned'}
    assert cmd_agent(parse('what is the weather?', '--quiet')) == 1 and 'did not recognise' in capsys.readouterr().out
    assert cmd_agent(parse('annotate pbmc3k', '--set', 'agent.max_stepz=3')) == 2
    assert 'Unknown setting agent.max_stepz' in capsys.readouterr().err


def test_novelty_across_studies_is_relative_to_the_query(settings):
    """pbmc68k_reduced (300 cells) against pbmc3k: the relative score calls no known cluster novel, the distance to the
    reference most of them. At the cell level one poorly mixed joint-space cluster (pbmc68k_reduced's 'Dendritic'
    cells with classical-monocyte markers) is flagged: 0.28 of the cells, spread over clusters, none made novel."""
    st = AgentState(settings=settings)
    for name, args in [('load_data', {'dataset': 'pbmc68k_reduced'}), ('cluster', {}), ('markers', {})]:
        assert run_step(st, name, args, yes=True)['status'] == 'ok'
    assert run_step(st, 'build_reference', {'dataset': 'pbmc3k'}, yes=True)['status'] == 'ok'
    rel = run_step(st, 'assess_novelty', {}, yes=True)['result']
    flagged = float(st.adata.obs['scagent_is_novel'].mean())
    far = run_step(st, 'assess_novelty', {'relative': False}, yes=True)['result']
    assert rel['score'] == 'relative to the query' and rel['novel_clusters'] == [], rel
    assert len(far['novel_clusters']) >= 2 and st.adata.obs['scagent_is_novel'].mean() > max(0.5, 2 * flagged), flagged
    truth = st.adata.obs.groupby('leiden', observed=True)['cell_type'].agg(lambda s: s.value_counts().index[0])
    assert all(rel['clusters'][c]['nearest_reference_type'] == 'B' for c in truth.index[truth == 'CD19+ B'])
    assert run_step(st, 'build_reference', {'dataset': 'pbmc3k', 'hold_out': ['B']}, yes=True)['status'] == 'ok'
    held = run_step(st, 'assess_novelty', {}, yes=True)['result']   # B cells held out of the reference: found
    assert held['novel_clusters'] and sorted(held['novel_clusters']) == sorted(truth.index[truth == 'CD19+ B'])
