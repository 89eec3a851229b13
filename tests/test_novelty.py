"Novelty calibration, assessment on AnnData, and the LLM judge through the real OpenAI client against a stand-in."
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from deepseq_nb.backends import get_backend
from deepseq_nb.data import InputError
from deepseq_nb.memory import CellMemory
from deepseq_nb.novelty import assess_novelty, calibrate_novelty, judge_novelty, novelty_features, parse_judgement
from standin_server import Reply, StandinServer, openai_chat


def blobs(n, types, seed):
    "Gaussian cell types in 16 dimensions around fixed centres."
    centres = np.random.default_rng(42).normal(size=(6, 16))
    rng = np.random.default_rng(seed)
    y = rng.choice(types, n)
    return (centres[y] + 0.3 * rng.normal(size=(n, 16))).astype(np.float32), np.array([f't{i}' for i in y])


@pytest.fixture(scope='module')
def setup():
    X, y = blobs(600, [0, 1, 2, 3], 0)
    mem = CellMemory(); mem.add({'frozen': X}, obs=pd.DataFrame({'label': y}))
    Xc, yc = blobs(300, [0, 1, 2, 3], 1)
    cal_cells = ad.AnnData(np.zeros((300, 1), np.float32), obsm={'X_scgpt': Xc})
    Xq, yq = blobs(400, [0, 1, 2, 3, 4], 2)
    q = ad.AnnData(
        np.zeros((400, 1), np.float32),
        obs=pd.DataFrame({'cluster': yq}, index=[f'q{i}' for i in range(400)]),
        obsm={'X_scgpt': Xq},
    )
    return mem, cal_cells, q


def test_threshold_keeps_the_false_novel_rate(setup):
    mem, cal_cells, q = setup
    F = novelty_features(cal_cells, mem)
    for rate in (0.01, 0.05, 0.2):
        cal = calibrate_novelty(F, rate)
        flagged = (cal.scores(F).combined > cal.thresholds['combined']).mean()
        assert flagged <= rate and flagged >= rate - 0.02, (rate, flagged)
    assert calibrate_novelty(F, 0.2).thresholds['combined'] < calibrate_novelty(F, 0.01).thresholds['combined']


def test_assess_flags_the_new_type_and_not_the_known(setup):
    mem, cal_cells, q = setup
    cal = calibrate_novelty(novelty_features(cal_cells, mem), 0.05)
    out = assess_novelty(q, mem, cal, groupby='cluster', copy=True)
    assert 'scagent_is_novel' not in q.obs                      # copy=True left the input alone
    new = (out.obs.cluster == 't4').to_numpy()
    assert out.obs.scagent_is_novel[new].mean() > 0.9 and out.obs.scagent_is_novel[~new].mean() < 0.1
    C = pd.DataFrame(out.uns['scagent_novelty']['clusters']).set_index('cluster')
    assert C.is_novel.to_dict() == {c: c == 't4' for c in C.index}
    assert out.uns['scagent_novelty']['params']['threshold'] == cal.thresholds['combined']
    assert list(out.obsm['scagent_novelty_evidence'].columns[:2]) == ['frozen_knn', 'frozen_centroid']


def test_assess_refuses_what_it_cannot_score(setup):
    mem, cal_cells, q = setup
    cal = calibrate_novelty(novelty_features(cal_cells, mem), 0.05)
    bare = ad.AnnData(np.zeros((5, 1), np.float32))
    with pytest.raises(InputError, match='No evidence'): assess_novelty(bare, mem, cal)
    with pytest.raises(InputError, match="No 'tuned' score"): assess_novelty(q, mem, cal, score='tuned', copy=True)
    with pytest.raises(InputError, match="no column 'leiden'"): assess_novelty(q, mem, cal, groupby='leiden', copy=True)


MARKERS = {'t0': ['CD3E', 'CD3D', 'IL7R'], 't1': ['MS4A1', 'CD79A', 'CD79B'], 't2': ['LYZ', 'CD14', 'S100A8'],
           't3': ['NKG7', 'GNLY', 'GZMB'], 't4': ['PPBP', 'PF4', 'GP9']}
REF_TYPES = ['T cell', 'B cell', 'CD14-positive monocyte', 'natural killer cell']


@pytest.fixture
def assessed(setup):
    mem, cal_cells, q = setup
    cal = calibrate_novelty(novelty_features(cal_cells, mem), 0.05)
    return assess_novelty(q, mem, cal, groupby='cluster', copy=True)


def test_offline_judge_needs_distance_and_markers(assessed):
    J = judge_novelty(assessed, MARKERS, REF_TYPES, tissue='blood')
    assert J.loc['t4', 'rule_is_novel'] and J.loc['t4', 'kb_known_type'] == '' and J.loc['t4', 'is_novel']
    assert not J.drop(index='t4').is_novel.any()
    # a flagged cluster whose markers read as a reference type is not reported as new
    J2 = judge_novelty(assessed, MARKERS | {'t4': MARKERS['t1']}, REF_TYPES, tissue='blood')
    assert J2.loc['t4', 'rule_is_novel'] and J2.loc['t4', 'kb_known_type'] == 'B cell' and not J2.loc['t4', 'is_novel']
    assert 'judge' in assessed.uns['scagent_novelty']


def _judge_answers(path, body):
    prompt = body['messages'][-1]['content']
    novel = 'PPBP' in prompt
    return Reply(200, openai_chat(json.dumps({'is_novel': novel, 'closest_type': 'platelet' if novel else 'known',
                                              'explanation': 'PPBP, PF4' if novel else 'reference markers'})))


def test_llm_judge_cached_and_resumable(assessed, tmp_path, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test-not-real')
    with StandinServer() as srv:
        backend = lambda: get_backend(
            'openai:gpt-4o-mini',
            base_url=srv.url + '/v1',
            cache=tmp_path / 'cache',
            progress=False,
            max_retries=0,
            structured=True,
        )
        calls = {'n': 0}

        def flaky(path, body):  # the third cluster's call fails: the first two answers must survive
            calls['n'] += 1
            return Reply(500, {'error': 'boom'}) if calls['n'] == 3 else _judge_answers(path, body)
        srv.script = flaky
        with pytest.raises(Exception, match="500|boom|Internal"):
            judge_novelty(assessed, MARKERS, REF_TYPES, backend=backend(), tissue="blood")
        assert len(srv.calls('/v1/chat/completions')) == 3
        srv.reset(); srv.script = _judge_answers
        J = judge_novelty(assessed, MARKERS, REF_TYPES, backend=backend(), tissue='blood')
        assert len(srv.calls('/v1/chat/completions')) == 3            # 5 clusters, 2 from the cache
        assert J.cached.tolist().count(True) == 2
        assert (
            J.loc['t4', 'is_novel']
            and J.loc['t4', 'closest_type'] == 'platelet'
            and not J.drop(index='t4').is_novel.any()
        )
        body = srv.calls('/v1/chat/completions')[0]['body']
        assert 'response_format' not in body  # the annotation schema is not imposed on the judge
        assert 'sk-test' not in (tmp_path/'cache'/'answers.sqlite').read_bytes().decode(errors='ignore')
        srv.reset()
        J2 = judge_novelty(assessed, MARKERS, REF_TYPES, backend=backend(), tissue='blood')
        assert srv.calls('/v1/chat/completions') == [] and J2.cached.all()


def test_unparseable_judgement_is_not_cached(assessed, tmp_path, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test-not-real')
    with StandinServer() as srv:
        srv.script = lambda p, b: Reply(200, openai_chat('I think it might be new.'))
        be = get_backend('openai:m', base_url=srv.url + '/v1', cache=tmp_path/'c', progress=False, max_retries=0)
        with pytest.raises(ValueError, match='No JSON object'): judge_novelty(assessed, MARKERS, REF_TYPES, backend=be)
        srv.script = _judge_answers
        judge_novelty(assessed, MARKERS, REF_TYPES, backend=be)
        assert len(srv.calls('/v1/chat/completions')) == 1 + 5


def test_parse_judgement_strictness():
    assert parse_judgement('{"is_novel": false}') == dict(is_novel=False, closest_type='', explanation='')
    with pytest.raises(ValueError): parse_judgement('{"novel": true}')
    with pytest.raises(ValueError): parse_judgement('{"is_novel": 1}')


def study(n, types, shift, seed, name):
    "Log-counts of `types` on 120 genes (a programme of 30 genes each), plus a study-wide offset on every gene."
    prog = np.random.default_rng(7).gamma(2, 1, size=(4, 120)) * (np.arange(120)[None] // 30 == np.arange(4)[:, None])
    rng = np.random.default_rng(seed)
    y = rng.choice(types, n)
    X = np.log1p(rng.poisson(prog[y] * 3 + 0.5 + shift * np.random.default_rng(8).random(120))).astype(np.float32)
    return ad.AnnData(
        X,
        obs=pd.DataFrame({'label': [f't{i}' for i in y], 'dataset': name}, index=[f'{name}{i}' for i in range(n)]),
        var=pd.DataFrame(index=[f'g{i}' for i in range(120)]),
    )


def test_relative_novelty_flags_the_new_cluster_only():
    from deepseq_nb.novelty_query import relative_novelty

    ref, cal, q = (
        study(300, [0, 1, 2], 0, 0, 'r'),
        study(300, [0, 1, 2], 0, 1, 'r'),
        study(300, [0, 1, 2, 3], 0, 2, 'q'),
    )
    o = relative_novelty(ref, q, cal, kb=False)
    new = (q.obs.label == 't3').to_numpy()
    flag = o['cells'].is_novel.to_numpy()
    assert flag[new].mean() > 0.9 and flag[~new].mean() < 0.35, (flag[new].mean(), flag[~new].mean())
    assert o['cells'].score[new].min() > o['cells'].score[~new].max()
    assert o['thresholds']['used'] == max(o['thresholds']['reference'], o['thresholds']['query'])


def test_adapters_bring_the_query_onto_the_reference():
    from deepseq_nb.novelty_query import joint_space
    ref, q = study(300, [0, 1, 2], 0, 0, 'r'), study(300, [0, 1, 2], 1.0, 2, 'q')
    near = lambda R, Q: np.median(np.min(((Q[:, None] - R[None]) ** 2).sum(-1), 1))
    assert near(*joint_space(ref, q, adapter='mnn')) < 0.8 * near(*joint_space(ref, q, adapter='none'))
    assert near(*joint_space(ref, q, adapter='harmony')) < 0.8 * near(*joint_space(ref, q, adapter='none'))
    with pytest.raises(InputError, match='adapter must be'): joint_space(ref, q, adapter='scanorama')
    with pytest.raises(InputError, match='share 0 measured genes'):
        joint_space(ref, ad.AnnData(q.X, obs=q.obs, var=pd.DataFrame(index=[f'x{i}' for i in range(120)])))


def test_renorm_puts_two_gene_panels_on_one_scale():
    "A query with 60 of the reference's 200 genes (normalised on its panel) lands on the reference once renormalised."
    from deepseq_nb.novelty_query import joint_space
    rng = np.random.default_rng(0)
    prog = rng.gamma(2, 1, size=(3, 200)) * (np.arange(200)[None] // 20 == np.arange(3)[:, None]) + 0.2
    def cells(n, genes, seed, name):
        r = np.random.default_rng(seed); y = r.choice(3, n)
        C = r.poisson(prog[y] * 50)[:, genes].astype(float)
        X = np.log1p(C / np.maximum(C.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
        return ad.AnnData(X, obs=pd.DataFrame({'dataset': name}, index=[f'{name}{i}' for i in range(n)]),
                          var=pd.DataFrame(index=[f'g{i}' for i in genes]))
    ref, q = cells(300, np.arange(200), 1, 'r'), cells(300, np.arange(60), 2, 'q')
    near = lambda R, Q: np.median(np.min(((Q[:, None] - R[None]) ** 2).sum(-1), 1))
    assert near(*joint_space(ref, q)) < 0.5 * near(*joint_space(ref, q, renorm=False))


def test_relative_novelty_warns_when_the_studies_do_not_overlap():
    from deepseq_nb.novelty_query import relative_novelty
    ref, cal, q = study(200, [0, 1, 2], 0, 0, 'r'), study(100, [0, 1, 2], 0, 1, 'r'), study(200, [0, 1, 2], 0, 2, 'q')
    for i, (a, off) in enumerate(((ref, 0), (cal, 0), (q, 100))):
        # the query far from both
        a.obsm['X_scgpt'] = np.random.default_rng(i).normal(size=(a.n_obs, 8)).astype(np.float32) + off
    with pytest.warns(UserWarning, match='do not overlap'):   # the embedding as it is
        o = relative_novelty(ref, q, cal, space='frozen', kb=False, drop_top=0)
    # every score tied at 1: it cannot rank the clusters
    assert (o['mixing']['share'] == 0 and (o['cells'].score == 1).all())
    # an offset along one direction is the embedding's top direction: all_but_the_top (the default) removes it
    o = relative_novelty(ref, q, cal, space='frozen', kb=False)
    assert o['mixing']['share'] > 0.3


def test_cluster_level_rates():
    "Detection per cluster: the clusters the new type makes up most of; detectable: the share of its cells inside them."
    from deepseq_nb.novelty_experiments import _fold_rates
    new = np.array([1, 1, 1, 1, 0, 0, 0, 1, 0, 0], bool)
    cl = np.array(['a', 'a', 'a', 'b', 'b', 'b', 'c', 'c', 'd', 'd'])
    flag = np.isin(cl, ['a'])
    out = _fold_rates(pd.DataFrame({'pca': new.astype(float)}), {'pca': flag}, new, ~new, {'pca': cl})
    assert out['detection_pca'] == 0.6 and out['false_novel_pca'] == 0
    # only cluster a is mostly new; 3 of 5 new cells
    assert (out['detection_cluster_pca'] == 1.0 and out['detectable_pca'] == 0.6)
    out = _fold_rates(pd.DataFrame({'pca': new.astype(float)}), {'pca': ~flag}, new, ~new, {'pca': cl})
    assert out['detection_cluster_pca'] == 0.0 and out['false_novel_pca'] == 1.0
