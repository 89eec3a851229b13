"annotate() end to end, a real client against the loopback stand-in server: labels on the AnnData, a cached rerun."
import numpy as np, pandas as pd, pytest, scipy.sparse as sp, anndata as ad

from standin_server import Reply, ollama_chat, openai_chat, label_by_first_marker, last_user_text
from deepseq_nb.annotate import annotate

TABLE = {'CD3D': 'CD4+ T cell', 'MS4A1': 'B cells', 'LYZ': 'CD14+ monocyte'}
MARKERS = {'0': ['CD3D', 'IL7R'], '1': ['MS4A1', 'CD79A'], '2': ['LYZ', 'CD14']}

def _adata():
    obs = pd.DataFrame({'leiden': pd.Categorical(['0']*4 + ['1']*3 + ['2']*2)})
    a = ad.AnnData(sp.csr_matrix(np.ones((9, 2), np.float32)), obs=obs)
    tab = pd.DataFrame([dict(cluster=c, rank=i+1, gene=g) for c, gs in MARKERS.items() for i, g in enumerate(gs)])
    a.uns['markers'] = {'table': tab, 'params': {'groupby': 'leiden', 'n_genes': 2}}
    return a

@pytest.fixture
def server(server):
    "conftest's stand-in server, answering every chat route from the markers in the prompt."
    ans = label_by_first_marker(TABLE)
    server.script = lambda path, body: (Reply(200, ollama_chat(ans(last_user_text(body)))) if path == '/api/chat'
                                        else Reply(200, openai_chat(ans(last_user_text(body)))))
    return server

def test_annotate_ollama_then_cached(server, tmp_path):
    a = _adata()
    kw = dict(
        backend='ollama:llama3.2:1b', tissue='PBMC', n_genes=2, host=server.url, cache=tmp_path / 'c', progress=False
    )
    annotate(a, **kw)
    assert list(a.obs['deepseq_label']) == ['CD4+ T cell']*4 + ['B cells']*3 + ['CD14+ monocyte']*2
    assert a.obs.loc[a.obs.leiden == '1', 'deepseq_cl_id'].iloc[0] == 'CL:0000236'  # "B cells" mapped to the CL B cell
    t = a.uns['deepseq']['table'].set_index('cluster')
    assert t.loc['2', 'markers'] == 'LYZ, CD14' and t['n_cells'].tolist() == [4, 3, 2]
    assert a.uns['deepseq']['stats']['calls'] == 1 and 'CD3D, IL7R' in t.loc['0', 'prompt']
    n = len(server.calls('/api/chat'))
    b = _adata(); annotate(b, **kw)
    assert len(server.calls('/api/chat')) == n and b.uns['deepseq']['stats']['cache_hits'] >= 1
    assert (b.obs['deepseq_label'] == a.obs['deepseq_label']).all()

def test_annotate_openai_key_not_in_uns(server, tmp_path, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-secret-123456')
    a = _adata()
    annotate(a, backend='openai:gpt-4o', n_genes=2, base_url=server.url + '/v1', cache=tmp_path/'c', progress=False)
    assert a.obs['deepseq_label'].iloc[-1] == 'CD14+ monocyte'
    a.write_h5ad(tmp_path/'a.h5ad')
    assert b'sk-secret-123456' not in (tmp_path/'a.h5ad').read_bytes()
    assert all(b'sk-secret-123456' not in p.read_bytes() for p in (tmp_path/'c').rglob('*') if p.is_file())

def test_annotate_needs_clusters():
    with pytest.raises(KeyError, match='run deepseq_nb.cluster.cluster'): annotate(_adata(), groupby='louvain')

def _expressed():
    "Three clusters of 20 cells with real gene names: T (CD3D, CD3E, CD8A in half), B (MS4A1, CD79A), monocytes."
    genes = ['CD3D', 'CD3E', 'CD8A', 'CD4', 'MS4A1', 'CD79A', 'CD19', 'LYZ', 'CD14', 'FCN1', 'GAPDH']
    on = {'0': ['CD3D', 'CD3E'], '1': ['MS4A1', 'CD79A', 'CD19'], '2': ['LYZ', 'CD14', 'FCN1']}
    X = np.zeros((60, len(genes)), np.float32)
    for k, (c, gs) in enumerate(on.items()):
        for g in gs + ['GAPDH']: X[20 * k:20 * (k + 1), genes.index(g)] = 3.0
    X[:10, genes.index('CD8A')] = 3.0  # CD8A in half of the T cluster
    obs = pd.DataFrame({'leiden': pd.Categorical(np.repeat(['0', '1', '2'], 20))}, index=[f'c{i}' for i in range(60)])
    a = ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes))
    tab = pd.DataFrame([dict(cluster=c, rank=i+1, gene=g) for c, gs in MARKERS.items() for i, g in enumerate(gs)])
    a.uns['markers'] = {'table': tab, 'params': {'groupby': 'leiden', 'n_genes': 2}}
    return a

def test_annotate_evidence_reaches_the_prompt(server, tmp_path):
    kw = dict(backend='ollama:llama3.2:1b', tissue='PBMC', species='human', n_genes=2, host=server.url,
              cache=tmp_path / 'c', progress=False)
    a = _expressed(); annotate(a, **kw)
    plain = [last_user_text(r['body']) for r in server.calls('/api/chat')]
    assert len(plain) == 1 and 'Detected' not in plain[0]  # off by default: the published prompt
    b = _expressed(); annotate(b, evidence=True, **kw)
    sent = [last_user_text(r['body']) for r in server.calls('/api/chat')][1:]
    assert len(sent) == 1 and b.uns['deepseq']['stats']['cache_hits'] == 0  # a new prompt, not the cached answer
    t = b.uns['deepseq']['table'].set_index('cluster')
    assert 'CD8A 50% (0%)' in t.loc['0', 'evidence'] and '   Detected: ' + t.loc['0', 'evidence'] in sent[0]
    assert b.uns['deepseq']['params']['evidence'] is True and 'evidence' not in a.uns['deepseq']['table']
    assert list(b.obs['deepseq_label']) == list(a.obs['deepseq_label'])  # the stand-in answers from the first marker

def test_annotate_evidence_refused_for_kb():
    with pytest.raises(ValueError, match='for the LLM backends'): annotate(_expressed(), backend='kb', evidence=True)

def test_annotate_cluster_of_one_cell_is_unknown_not_missing(server, tmp_path):
    a = _expressed()
    a.obs['leiden'] = a.obs['leiden'].cat.add_categories('3'); a.obs.loc['c0', 'leiden'] = '3'  # one cell alone
    del a.uns['markers']  # rank them afresh: cluster 3 gets none (with a warning) and is not asked
    with pytest.warns(UserWarning, match='hold one cell'):
        annotate(a, backend='ollama:llama3.2:1b', tissue='PBMC', species='human', n_genes=2, host=server.url,
                 cache=tmp_path / 'c', progress=False)
    assert a.obs.loc['c0', 'deepseq_label'] == 'Unknown' and a.obs['deepseq_label'].notna().all()
    assert set(a.uns['deepseq']['table']['cluster']) == {'0', '1', '2'}
