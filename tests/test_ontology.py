"Tests of free text → Cell Ontology mapping (`deepseq_nb.ontology.to_cl`): the general reading rules, one case each."
import pytest
from deepseq_nb.ontology import to_cl, to_cl_all, normalize_label

@pytest.mark.parametrize('label,tissue,want', [
    ('beta islet cell', None, 'type B pancreatic cell'),            # organ word anywhere in the label
    ('alpha islet cell', 'Pancreas', 'pancreatic A cell'),
    ('gamma islet cell', 'Pancreas', 'pancreatic PP cell'),         # islet gamma cell = PP cell
    ('Pancreatic gamma cells', None, 'pancreatic PP cell'),
    ('gamma', 'pancreas', 'pancreatic PP cell'),                    # bare islet letters in a pancreas
    ('delta', 'pancreas', 'pancreatic D cell'),
    ('Uterine epithelial cells', None, 'epithelial cell of uterus'),
    ('cDC1s', None, 'CD141-positive myeloid dendritic cell'),       # plural abbreviation
    ('Cardiomyocytes', None, 'cardiac muscle cell'),                # not `fetal cardiomyocyte`
    ('Basal epithelial cells', None, 'basal cell'),                 # a generic `epithelial`
    ('CD4+/CD25 T Reg', 'PBMC', 'CD4-positive, CD25-positive, alpha-beta regulatory T cell'),
    ('FCGR3A+ Mono', 'PBMC', 'CD14-positive, CD16-positive monocyte'),  # gene symbol → CD name (CL's `CD16+ monocyte`)
    ('CD4+/CD45RA+/CD25- Naive T', 'PBMC', 'naive thymus-derived CD4-positive, alpha-beta T cell'),
])
def test_to_cl_rules(label, tissue, want):
    m = to_cl(label, tissue)
    assert m.name == want and m.exact, m

def test_species_specific_synonym_never_wins_for_a_bare_letter():
    assert to_cl('alpha').id is None and to_cl('Alpha cells').id is None  # pancreatic or pituitary; never (Mmus) retina
    assert to_cl('alpha', 'pancreas').name == 'pancreatic A cell'

def test_marker_labels_are_kinds_of_when_words_are_left_over():
    m = to_cl('CD8+/CD45RA+ Naive Cytotoxic')
    assert m.name == 'naive thymus-derived CD8-positive, alpha-beta T cell' and m.how == 'head'
    assert to_cl('CD34+').how == 'head' and to_cl('CD1C+_B dendritic cell').name == 'dendritic cell'
    assert [x.name for x in to_cl_all('CD8+/CD45RA+ Naive Cytotoxic')] == [m.name]  # `+/` joins markers, is no split

def test_normalisation_does_not_double_cell():
    assert normalize_label('Basal epithelial cells') == 'basal epithelial cell'
    assert normalize_label('CD4-CD28+ T cell') == 'cd4 negative cd28 positive t cell'
