"celltyping, annotate(backend='kb') on expression: planted-marker lineages, obs/uns outputs, species, h5ad round trip."
import warnings
import numpy as np, pandas as pd, pytest, scipy.sparse as sp, anndata as ad

from deepseq_nb.celltyping import celltype, cluster_stats, infer_species, score_annotation, MarkerNetwork, gene_evidence
from deepseq_nb.annotate import annotate

PLANTED = {'T': ['CD3D', 'CD3E', 'CD3G', 'TRAC', 'CD5', 'CD6', 'CD28', 'IL7R'],
           'B': ['MS4A1', 'CD19', 'CD79A', 'CD79B', 'CD22', 'PAX5', 'BANK1'],
           'Mono': ['CD14', 'LYZ', 'FCN1', 'S100A8', 'S100A9', 'VCAN', 'CSF1R']}
FILLER = [f'GENE{i}' for i in range(200)]

def _toy(n=60, seed=0, mouse=False):
    "Three clusters of n cells; each expresses its planted markers (and PTPRC) at high rate, the rest at a low rate."
    rng = np.random.default_rng(seed)
    genes = ['PTPRC'] + [g for v in PLANTED.values() for g in v] + FILLER
    X = rng.poisson(0.05, (3*n, len(genes))).astype(np.float32)
    X[:, 0] += rng.poisson(3, 3*n)
    for c, (k, gs) in enumerate(PLANTED.items()):
        for g in gs: X[c*n:(c + 1)*n, genes.index(g)] += rng.poisson(4, n)
    X[:, 1 + len(sum(PLANTED.values(), [])):] += rng.poisson(1, (3*n, len(FILLER)))
    obs = pd.DataFrame({'leiden': pd.Categorical(np.repeat(['0', '1', '2'], n))}, index=[f'c{i}' for i in range(3*n)])
    a = ad.AnnData(sp.csr_matrix(X), obs=obs)
    a.var_names = [g.capitalize() if mouse else g for g in genes]
    return a

def test_lineages_from_planted_markers():
    a = _toy(); a.obs['species'] = 'human'
    tab, ev = celltype(a, tissue='blood')
    assert list(tab.broad) == ['T/NK cell', 'B cell', 'monocyte/macrophage']
    assert tab.loc['0', 'lineage'] == 'leukocyte' and 'T cell' in tab.loc['0', 'path']
    assert tab.confidence.between(0, 1).all() and (tab.n_cells == 60).all()
    chosen = ev[(ev.cluster == '1') & (ev.role == 'chosen')]
    assert chosen.genes_for.str.contains('MS4A1|CD79A|CD19').any()  # evidence names the planted genes

def test_cluster_stats_values():
    a = _toy(n=10)
    st = cluster_stats(a)
    X = a.X.toarray()
    j = list(a.var_names).index('CD14')
    assert np.isclose(st['frac_in'][2, j], (X[20:, j] > 0).mean())
    assert np.isclose(st['frac_out'][2, j], (X[:20, j] > 0).mean())
    assert np.isclose(st['mean_in'][0, j], X[:10, j].mean())

def test_negative_marker_lowers_score():
    a = _toy(n=30); st = cluster_stats(a)
    net = MarkerNetwork('human', None, st['genes'])
    from deepseq_nb.celltyping import own_scores
    S = gene_evidence(st['frac_in'], st['frac_out'])
    nk, t = net.ids.index('CL:0000623'), net.ids.index('CL:0000084')
    P = own_scores(net, S)
    assert P[0, t] > P[0, nk]  # the T cluster expresses CD3, a negative marker of NK cells

def test_annotate_writes_obs_and_uns(tmp_path):
    a = _toy(); a.obs['species'] = 'human'; a.obs['tissue'] = 'blood'
    annotate(a, backend='kb')
    for c in ('label', 'name', 'broad', 'cl_id', 'cl_name', 'confidence'): assert f'deepseq_{c}' in a.obs
    assert a.obs.groupby('leiden', observed=True)['deepseq_broad'].first().tolist() == [
        'T/NK cell',
        'B cell',
        'monocyte/macrophage',
    ]
    u = a.uns['deepseq']
    assert u['engine'] == 'celltyping' and u['params']['species'] == 'human' and u['params']['tissue'] == 'blood'
    assert {'genes_for', 'genes_against', 'candidate'} <= set(u['evidence'].columns) and len(u['evidence']) >= 3
    a.write_h5ad(tmp_path/'a.h5ad')
    b = ad.read_h5ad(tmp_path/'a.h5ad')
    assert (b.obs['deepseq_label'].astype(str) == a.obs['deepseq_label'].astype(str)).all()

def test_species_from_gene_case_warns():
    a = _toy(mouse=True)
    with pytest.warns(UserWarning, match="inferred 'mouse'.*species="):
        annotate(a, backend='kb')
    assert a.uns['deepseq']['params']['species'] == 'mouse'
    assert a.obs.groupby('leiden', observed=True)['deepseq_broad'].first().iloc[1] == 'B cell'  # Cd79a meets CD79A

def test_obs_species_beats_settings_and_no_warning():
    a = _toy(); a.obs['species'] = 'human'
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        assert infer_species(a) == 'human'
    a.obs['species'] = 'mouse'
    assert infer_species(a) == 'mouse' and infer_species(a, 'human') == 'human'

def test_marker_list_path_kept():
    a = ad.AnnData(obs=pd.DataFrame({'leiden': pd.Categorical(['0', '0', '1'])}, index=['a', 'b', 'c']))
    tab = pd.DataFrame(
        [
            dict(cluster=c, rank=i + 1, gene=g)
            for c, gs in {'0': ['MS4A1', 'CD79A', 'CD19'], '1': ['CD3E', 'CD3D', 'CD2']}.items()
            for i, g in enumerate(gs)
        ]
    )
    a.uns['markers'] = {'table': tab, 'params': {'groupby': 'leiden', 'n_genes': 3}}
    annotate(a, backend='kb', n_genes=3)  # no genes in X: the marker-list path
    assert 'evidence' not in a.uns['deepseq'] and a.obs['deepseq_label'].iloc[0] != 'Unknown'

def test_bad_kb_mode():
    with pytest.raises(ValueError, match="kb_mode must be"): annotate(_toy(n=5), kb_mode='magic')

def test_hybrid_refines_only_within_the_lineage():
    a = _toy(); a.obs['species'] = 'human'
    annotate(a, backend='kb')  # default: hybrid
    t = a.uns['deepseq']['table'].set_index('cluster')
    assert a.uns['deepseq']['params']['kb_mode'] == 'hybrid' and set(t['source']) <= {
        'expression',
        'markers within the expression lineage',
        'markers (expression found no lineage)',
    }
    b = _toy(); b.obs['species'] = 'human'; annotate(b, backend='kb', kb_mode='expression')
    e = b.uns['deepseq']['table'].set_index('cluster')
    assert (t['broad'] == e['broad']).all()  # refinement never leaves the lineage the expression chose

def test_score_annotation_values():
    s = score_annotation(['B', 'B', 'NK', 'NK'], ['B cell', 'B cell', 'T cell', 'Unknown'], 'PBMC')
    assert s['exact'] == 0.5 and s['lineage'] == 0.75 and s['n_cells'] == 4

def test_tissue_drop_removes_types_never_recorded_in_the_tissue(monkeypatch):
    import deepseq_nb.celltyping as C
    from deepseq_nb.knowledge import kb_index
    ix = kb_index('human'); genes = np.array(ix.genes)
    d = 'CL:0000173'  # pancreatic D cell: recorded in pancreas (and liver) only
    assert not ix.ubiquitous[d] and 'testis' not in ix.tissues[d]
    assert d in MarkerNetwork('human', 'Pancreas', genes).ids
    assert d not in MarkerNetwork('human', 'Testis', genes).ids
    monkeypatch.setattr(C, 'TISSUE_DROP', False)  # the old behaviour: kept, its score halved
    net = MarkerNetwork('human', 'Testis', genes)
    assert net.prior[net.ids.index(d)] == pytest.approx(0.5)

def test_compatible_children_are_not_rivals():
    from deepseq_nb.celltyping import _compatible
    from deepseq_nb.knowledge import kb_index
    net = MarkerNetwork('human', 'blood', np.array(kb_index('human').genes))
    i = {c: net.ids.index(c) for c in ('CL:0000895', 'CL:0000898', 'CL:0000624', 'CL:0000625')}
    # naive T cell and CD4-positive alpha-beta T cell share naive thymus-derived CD4-positive alpha-beta T cell
    assert i['CL:0000895'] in net.sub[i['CL:0000898']] and i['CL:0000895'] in net.sub[i['CL:0000624']]
    assert _compatible(net, i['CL:0000898'], i['CL:0000624'])
    assert not _compatible(net, i['CL:0000624'], i['CL:0000625'])  # CD4 vs CD8: no type below both

def test_species_tagged_terms_are_no_candidates():
    from deepseq_nb.knowledge import kb_index
    net = MarkerNetwork('human', 'blood', np.array(kb_index('human').genes))
    assert 'CL:0000939' not in net.ids  # CD16-positive, CD56-dim natural killer cell, human
    assert 'CL:0000623' in net.ids and not any(n.endswith((', human', ', mouse')) for n in net.names)

def test_defining_antigen_must_be_readable(monkeypatch):
    import deepseq_nb.celltyping as C
    from deepseq_nb.knowledge import kb_index
    genes = np.array(kb_index('human').genes)
    net = MarkerNetwork('human', 'blood', genes)
    assert 'CL:4030002' not in net.ids  # CD45RA: a PTPRC isoform, not told apart by gene counts
    assert 'CL:0002394' in net.ids  # CD141-positive myeloid dendritic cell: THBD measured
    assert 'CL:0002394' not in MarkerNetwork('human', 'blood', genes[genes != 'THBD']).ids  # THBD not measured
    monkeypatch.setattr(C, 'DEFINING', False)
    assert {'CL:4030002', 'CL:0002394'} <= set(MarkerNetwork('human', 'blood', genes[genes != 'THBD']).ids)

def test_refine_only_breaks_the_tie(monkeypatch):
    import deepseq_nb.annotate as A
    e = pd.DataFrame(
        {
            'label': ['monocyte', 'B cell', 'Unknown'],
            'cl_id': ['CL:0000576', 'CL:0000236', None],
            'name': ['monocyte', 'B cell', 'Unknown'],
            'broad': ['m', 'b', 'Unknown'],
            'confidence': [0.3, 0.3, 0.0],
            'tied': ['CL:0000875;CL:0000860', '', None],
        },
        index=['0', '1', '2'],
    )
    m = pd.DataFrame({'cl_id': ['CL:0002057', 'CL:0000788', 'CL:0000236'], 'cl_name': ['x', 'naive B cell', 'B cell'],
                      'confidence': [0.9, 0.9, 0.9]}, index=['0', '1', '2'])
    r = A._refine(e, m)
    # CD14+CD16- classical monocyte lies under the tied 'classical monocyte': that child, no deeper
    assert (r.at['0', 'cl_id'] == 'CL:0000860')
    # no tie at B cell: the markers add no level
    assert (r.at['1', 'cl_id'] == 'CL:0000236' and r.at['1', 'source'] == 'expression')
    assert r.at['2', 'cl_id'] == 'CL:0000236'  # expression found no lineage: the marker answer
    monkeypatch.setattr(A, 'REFINE', 'all')
    r = A._refine(e, m)
    assert r.at['0', 'cl_id'] == 'CL:0002057' and r.at['1', 'cl_id'] == 'CL:0000788'  # the old rule: any descendant

def test_defining_antigens_read_presence_not_levels():
    from deepseq_nb.celltyping import defining_antigens
    pos, neg = defining_antigens('CL:0000895')  # naive CD4 T: CCR7+, CD127+, CD62L+, CD25-; 'CD44-low' is a level
    assert pos == ['CCR7', 'CD4', 'IL7R', 'SELL'] and neg == ['IL2RA']
    assert defining_antigens('CL:0000860') == ([], [])  # 'high expression of CCR2': a level, not read

def test_antigen_gate_within_reference_clusters():
    import deepseq_nb.celltyping as ct
    from deepseq_nb.celltyping import knobs
    from deepseq_nb.knowledge import kb_index
    net = MarkerNetwork('human', 'blood', np.array(kb_index('human').genes))
    g = {x: i for i, x in enumerate(net.genes)}
    i4, i8 = net.ids.index('CL:0000624'), net.ids.index('CL:0000625')  # CD4-positive / CD8-positive, alpha-beta T cell
    assert g['CD4'] in net.antigens[i4][0] and g['CD8A'] in net.antigens[i8][0]
    ref = np.zeros((3, len(net.genes)))
    ref[:, g['CD4']] = [0.07, 0.15, 0.03]; ref[:, g['CD8A']] = [0.15, 0.07, 0.47]  # pbmc3k's T clusters, rounded
    ag = ct.antigen_scores(net, ref[0], ref)
    # CD8-positive: CD8A read at a third of the brightest, or its alternative CD4 at just under half: the better reading
    assert ag[i4] > ag[i8] and abs(ag[i8] - max(0.15/0.47 - ct.GATE, ct.GATE - 0.07/0.15)) < 1e-9
    ref[:, g['CD4']] = 0.01  # nobody at the node detects CD4: no evidence either way, not absence ...
    with knobs(ct, ALTERNATIVE=False): bare = MarkerNetwork('human', 'blood', np.array(kb_index('human').genes))
    assert bare.ids == net.ids and ct.antigen_scores(bare, ref[0], ref)[i4] == 0.0
    # ... unless its CL alternative is read: CD8A at a third of the CD8 cluster's share speaks for 'CD4-positive'
    assert abs(ct.antigen_scores(net, ref[0], ref)[i4] - (ct.GATE - 0.15/0.47)) < 1e-9

def test_unmeasured_lineage_passes_no_evidence():
    import deepseq_nb.celltyping as ct
    from deepseq_nb.celltyping import knobs, own_scores

    # no epithelial/endocrine marker
    genes = np.array(['INS', 'IAPP', 'GCG', 'TTR', 'PCSK1', 'NPTX2', 'HADH', 'MAFA', 'G6PC2', 'ADCYAP1'])
    net = MarkerNetwork('human', 'pancreas', genes)
    b = net.ids.index('CL:0000169')  # type B pancreatic cell
    S = np.zeros((1, len(genes))); S[0, :2] = 1.0
    with knobs(ct, UNREAD='any'): p_any = own_scores(net, S)[0, b]
    with knobs(ct, UNREAD='off'): p_off = own_scores(net, S)[0, b]
    assert net.readable[net.lineage[b]] == 0 and p_any > p_off > 0

def _one_type(n=50, seed=0):
    "Three clusters of B cells that differ by state genes only (a sorted population clustered on its own)."
    rng = np.random.default_rng(seed)
    genes = ['PTPRC'] + PLANTED['B'] + FILLER
    X = rng.poisson(0.05, (3*n, len(genes))).astype(np.float32)
    X[:, 0] += rng.poisson(3, 3*n)
    for g in PLANTED['B']: X[:, genes.index(g)] += rng.poisson(rng.choice([1.0, 4.0], 3).repeat(n))  # depth differs
    for c in range(3): X[c*n:(c + 1)*n, 1 + len(PLANTED['B']) + 20*c:1 + len(PLANTED['B']) + 20*(c + 1)] += 3
    obs = pd.DataFrame({'leiden': pd.Categorical(np.repeat(['0', '1', '2'], n)), 'species': 'human'},
                       index=[f'c{i}' for i in range(3*n)])
    a = ad.AnnData(sp.csr_matrix(X), obs=obs); a.var_names = genes
    return a

def test_one_type_rule_reads_a_sorted_population_by_detection():
    import deepseq_nb.celltyping as ct
    a = _one_type()
    with ct.knobs(ct, HOMOGENEOUS='off'): off, _ = celltype(a, tissue='blood')
    on, _ = celltype(a, tissue='blood')
    assert (on.broad == 'B cell').all()  # every cluster of the population is read as what it is
    assert (off.broad != 'B cell').any()  # the contrast among clusters of one type alone does not get there
    assert (on.by_detection != '').any() and (on.by_detection[off.broad == 'B cell'] == '').all()

def test_one_type_rule_leaves_a_sample_of_several_types_alone():
    import deepseq_nb.celltyping as ct
    a = _toy(); a.obs['species'] = 'human'
    with ct.knobs(ct, HOMOGENEOUS='off'): off, ev_off = celltype(a, tissue='blood')
    on, ev_on = celltype(a, tissue='blood')
    assert on.drop(columns='by_detection').equals(off.drop(columns='by_detection')) and ev_on.equals(ev_off)
    assert (on.by_detection == '').all()

def test_unknown_tissue_warns_and_uberon_names_are_read():
    a = _toy(); a.obs['species'] = 'human'
    with pytest.warns(UserWarning, match="tissue 'Moon' names no organ"): celltype(a, tissue='Moon')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a plural or an UBERON structure is read, silently
        for t in ('islets', 'renal medulla'): celltype(a, tissue=t)

def test_large_sample_reference_partition_is_drawn_in_the_graphs_own_space(monkeypatch):
    import scanpy as sc
    import deepseq_nb.celltyping as ct
    a = _toy(n=60); rng = np.random.default_rng(0)
    a.obsm['X_alt'] = np.repeat(np.eye(3)*10, 60, axis=0) + rng.normal(size=(180, 3))  # e.g. a batch-corrected space
    sc.pp.neighbors(a, use_rep='X_alt', n_neighbors=10, random_state=0)  # no X_pca at all
    a.obs['leiden'] = pd.Categorical((np.arange(180) // 30).astype(str))  # each type split in two halves
    monkeypatch.setattr(ct, 'REF_CELLS', 90)  # 180 cells: a "large" sample
    ref = ct.reference_partition(a)
    assert ref is not None and len(np.unique(ref)) < 6  # drawn on a sample, coarser than the halves
    assert all(len(set(ref[t*60:(t + 1)*60]) & set(np.delete(ref, np.s_[t*60:(t + 1)*60]))) == 0 for t in range(3))

NK_MARKERS = ['NKG7', 'GNLY', 'KLRD1', 'KLRF1', 'PRF1']
T_MARKERS = ['CD3D', 'CD3E', 'CD3G', 'CD5', 'CD6']

def _two_lineages(both:bool, n:int=40, seed:int=0):
    "Cluster '0': a T half and an NK half (`both`: cells expressing the two); cluster '1': B cells; a kNN graph."
    import scanpy as sc
    import deepseq_nb.celltyping as ct
    rng = np.random.default_rng(seed)
    genes = T_MARKERS + NK_MARKERS + ['MS4A1', 'CD79A'] + FILLER
    X = rng.poisson(0.05, (3*n, len(genes))).astype(np.float32)
    on = [T_MARKERS + NK_MARKERS] * 2 if both else [T_MARKERS, NK_MARKERS]
    for k, gs in enumerate(on + [['MS4A1', 'CD79A']]):
        for g in gs: X[k*n:(k + 1)*n, genes.index(g)] += rng.poisson(4, n)
    X[:, -len(FILLER):] += rng.poisson(1, (3*n, len(FILLER)))
    obs = pd.DataFrame({'leiden': pd.Categorical(np.repeat(['0', '0', '1'], n))}, index=[f'c{i}' for i in range(3*n)])
    a = ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes))
    a.obs['species'] = 'human'; a.obs['tissue'] = 'blood'
    a.obsm['X_pca'] = np.log1p(X[:, :12])  # the marker space: the two halves are far apart
    sc.pp.neighbors(a, n_neighbors=10, use_rep='X_pca')
    a.uns['leiden'] = {'params': {'resolution': ct.COARSE}}  # clustered at the rules' resolution
    return a

def _read_by_markers(adata, groupby, species=None, tissue=None, layer=None, reference=None):
    "A stand-in for the descent: T or NK by which markers a group expresses, a T/NK tie if both, B otherwise."
    X = sp.csr_matrix(adata.X); g = adata.obs[groupby].astype(str)
    col = lambda ms: [list(adata.var_names).index(m) for m in ms]
    rows = []
    for c in sorted(g.unique()):
        m = X[(g == c).values]
        t, k = (np.asarray((m[:, col(ms)] > 0).mean()) for ms in (T_MARKERS, NK_MARKERS))
        cid, tied = ('CL:0000542', 'CL:0000084;CL:0000623') if t > 0.5 and k > 0.5 else (
            ('CL:0000084' if t > 0.5 else 'CL:0000623' if k > 0.5 else 'CL:0000236'), '')
        rows.append(dict(cluster=c, label=cid, name=cid, cl_id=cid, broad=cid, confidence=0.5, tied=tied,
                         n_cells=int(m.shape[0])))
    return pd.DataFrame(rows).set_index('cluster'), pd.DataFrame(columns=['cluster'])

def test_a_cluster_of_two_lineages_is_split_and_its_parts_labelled(monkeypatch):
    import deepseq_nb.celltyping as ct
    monkeypatch.setattr(ct, 'celltype', _read_by_markers)
    a = _two_lineages(both=False)
    annotate(a, backend='kb', kb_mode='expression')
    lab = a.obs['deepseq_label'].astype(str).to_numpy()
    assert (lab[:40] == 'CL:0000084').all() and (lab[40:80] == 'CL:0000623').all()  # T half, NK half
    assert a.obs['deepseq_cluster'].astype(str)[:80].str.startswith('0,').all()  # parts of cluster 0
    t = a.uns['deepseq']['table'].set_index('cluster')
    assert set(t.loc[t.part_of == '0'].index) == set(a.obs['deepseq_cluster'][:80].astype(str))
    assert a.uns['deepseq']['params']['clusters'] == 'deepseq_cluster'
    with ct.knobs(ct, SPLIT=False): annotate(a, backend='kb', kb_mode='expression')
    assert (a.obs['deepseq_label'].astype(str)[:80] == 'CL:0000542').all() and 'deepseq_cluster' not in a.obs

def test_a_tie_that_is_no_mix_stays_one_cluster(monkeypatch):
    import deepseq_nb.celltyping as ct
    monkeypatch.setattr(ct, 'celltype', _read_by_markers)
    a = _two_lineages(both=True)  # every cell of cluster 0 expresses both: its parts tie too
    tab, _, cells = ct.read_clusters(a)
    assert (cells == a.obs['leiden'].astype(str)).all() and (tab.part_of == '').all()
    assert tab.loc['0', 'tied'] == 'CL:0000084;CL:0000623'

def test_a_split_cluster_warns_once(monkeypatch):
    import deepseq_nb.celltyping as ct
    def warn_and_read(*args, **kw):  # as celltype does for a tissue it cannot place, on every call
        warnings.warn("tissue 'Moon' names no organ", UserWarning); return _read_by_markers(*args, **kw)
    monkeypatch.setattr(ct, 'celltype', warn_and_read)
    a = _two_lineages(both=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); _, _, cells = ct.read_clusters(a)
    assert cells.str.contains(',').sum() == 80  # cluster 0 was split: celltype ran two more times
    assert sum('Moon' in str(x.message) for x in w) == 1
