"Tests of the offline `kb` annotator (deepseq_nb.knowledge) on textbook marker lists and bad input."
import json
import pandas as pd
import pytest

from deepseq_nb.knowledge import (KB_COLUMNS, CAND_COLS, load_kb, kb_annotate, kb_annotate_table, retrieve,
                                  _prefer_specific, _is_descendant)


def top(markers, **kw):
    return kb_annotate(markers, **kw).iloc[0]


def lineage(row)->str:
    "Lower-case name plus CL label of the top candidate, for substring checks."
    return f"{row.cell_type} {row.cl_name}".lower()


def test_kb_table_columns_and_species():
    kb = load_kb()
    assert list(kb.columns) == KB_COLUMNS
    assert set(kb.species) == {'human', 'mouse'}
    assert set(kb.source) == {'PanglaoDB', 'CellMarker2', 'ScType'}
    assert set(load_kb('human').species) == {'human'} and set(load_kb('mouse').species) == {'mouse'}
    with pytest.raises(ValueError): load_kb('zebrafish')


def test_candidate_columns_and_ranges():
    c = kb_annotate(['MS4A1', 'CD79A', 'CD79B'], tissue='PBMC', top=3)
    assert set(CAND_COLS) <= set(c.columns) and 1 <= len(c) <= 3
    assert c.score.is_monotonic_decreasing or c.score.iloc[0] >= c.score.iloc[1:].min()
    assert ((c.confidence >= 0) & (c.confidence <= 1)).all()


def test_b_cell():
    r = top(['MS4A1', 'CD79A', 'CD79B'], tissue='PBMC')
    assert 'b cell' in lineage(r) and r.cl_id is not None
    assert {'MS4A1', 'CD79A'} <= set(r.evidence) and 0 < r.confidence <= 1


def test_monocyte():
    r = top(['LYZ', 'CD14', 'S100A8'], tissue='PBMC')
    assert 'monocyte' in lineage(r) and 'CD14' in r.evidence


def test_platelet_lineage():
    r = top(['PPBP', 'PF4'], tissue='PBMC')
    assert any(w in lineage(r) for w in ('platelet', 'megakaryocyte')), r.cell_type


def test_beta_cell_in_pancreas():
    r = top(['INS', 'IAPP'], tissue='Pancreas')
    assert r.cl_id == 'CL:0000169', r.cell_type  # CL's label for the beta cell is 'type B pancreatic cell'
    assert {'INS', 'IAPP'} <= set(r.evidence)


def test_mouse_symbols():
    r = top(['Cd79a', 'Cd79b', 'Ms4a1', 'Cd19'], species='mouse')
    assert 'b cell' in lineage(r) and 'CD79A' in r.evidence
    with pytest.raises(ValueError): kb_annotate(['CD3E'], species='fish')


@pytest.mark.parametrize('markers,tissue,word', [([], 'PBMC', 'empty'), (None, None, 'empty'),
                                                  (['NOTAGENE1', 'FOO2'], 'PBMC', 'known marker')])
def test_unknown_with_reason(markers, tissue, word):
    c = kb_annotate(markers, tissue=tissue)
    assert len(c) == 1 and c.cell_type.iloc[0] == 'Unknown' and c.confidence.iloc[0] == 0
    assert word in c.reason.iloc[0]


def test_na_and_unrecognised_tissue_do_not_crash():
    r = top(['MS4A1', 'CD79A'], tissue=float('nan'))
    assert 'b cell' in lineage(r)
    c = kb_annotate(['MS4A1', 'CD79A'], tissue='Moon')
    assert 'not recognised' in c.reason.iloc[0]


def test_retrieve_json():
    hits = retrieve(['CD3D', 'CD3E', 'IL7R'], tissue='PBMC', k=3)
    assert 1 <= len(hits) <= 3 and json.loads(json.dumps(hits)) == hits
    assert {'cell_type', 'cl_id', 'score', 'confidence', 'evidence', 'sources'} <= set(hits[0])
    assert retrieve(['NOTAGENE']) == [] and retrieve([]) == []


def test_annotate_table_with_na_row():
    t = pd.DataFrame(
        dict(marker=['MS4A1, CD79A, CD79B', None, 'PPBP, PF4'], tissue=['PBMC', None, 'PBMC']), index=[5, 6, 7]
    )
    r = kb_annotate_table(t)
    assert list(r.index) == [5, 6, 7]
    assert {'prediction', 'cl_id', 'confidence', 'evidence', 'reason'} <= set(r.columns)
    assert r.prediction[6] == 'Unknown' and 'empty' in r.reason[6]
    assert r.prediction[5] != 'Unknown' and r.prediction[7] != 'Unknown'
    with pytest.raises(KeyError): kb_annotate_table(t, marker_col='genes')


def test_prefer_specific_descendant():
    # myeloid cell > monocyte > classical monocyte in CL; a descendant nearly as strong wins, a weak one does not
    assert _is_descendant('CL:0000860', 'CL:0000763') and not _is_descendant('CL:0000763', 'CL:0000860')
    r = [dict(cl_id='CL:0000763', score=10.0), dict(cl_id='CL:0000576', score=9.0), dict(cl_id='CL:0000860', score=8.5)]
    assert _prefer_specific(r)[0]['cl_id'] == 'CL:0000860'
    r = [dict(cl_id='CL:0000763', score=10.0), dict(cl_id='CL:0000576', score=5.0)]
    assert _prefer_specific(r)[0]['cl_id'] == 'CL:0000763'
