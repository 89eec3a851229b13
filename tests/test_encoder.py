"""The scGPT encoder: what the notebook cannot show well.

- the torchtext stand-in is used only when `import torchtext.vocab` fails (fresh interpreters, fake torchtext packages);
- a checkpoint written by hand in the official layout, with flash-attn weight names and the specials at the end of
  vocab.json as in the released files, loads and gives exactly the original model's outputs;
- broken checkpoint directories give errors that say what is missing and what to do;
- pretraining and embedding are deterministic with fixed seeds; the cached build is safe under concurrency.
"""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import deepseq_nb.encoder as E
import deepseq_nb.pretrain as P
from deepseq_nb.data import load_dataset

TINY = dict(d_model=16, nlayers=1, nhead=2, d_hid=32, max_len=32, epochs=1, batch_size=128, datasets=['pancreas_wang'])


def _run(code: str, pythonpath: Path | None = None) -> dict:
    "Run `code` in a fresh interpreter (optionally with `pythonpath` first on sys.path); the JSON it prints last."
    env = dict(os.environ)
    if pythonpath: env['PYTHONPATH'] = os.pathsep.join([str(pythonpath), env.get('PYTHONPATH', '')])
    r = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


PROBE = """
    import json, sys
    import deepseq_nb.encoder as E
    from deepseq_nb.torchtext_compat import torchtext_status
    TransformerModel, GeneVocab = E.scgpt_classes()
    import torchtext.vocab as tv
    v = E.make_vocab(['CD3E', 'MS4A1'])
    print(json.dumps(dict(status=torchtext_status(), base=GeneVocab.__mro__[1].__module__,
                          fake=getattr(tv, 'FAKE', False), itos=v.get_itos(),
                          scgpt_shell=getattr(sys.modules['scgpt'], '__deepseq_shell__', False))))
"""


def test_compat_when_torchtext_is_absent():
    out = _run(PROBE)
    assert out['status']['used'] == 'compat' and 'No module named' in out['status']['reason']
    assert out['base'] == 'deepseq_nb.torchtext_compat' and out['itos'] == ['<pad>', '<cls>', '<eoc>', 'CD3E', 'MS4A1']
    assert out['scgpt_shell']


def test_compat_when_torchtext_fails_to_load(tmp_path):
    # what torchtext 0.18 does with a newer torch: its compiled extension does not load
    (tmp_path/'torchtext').mkdir()
    (tmp_path/'torchtext'/'__init__.py').write_text("from . import _extension\n")
    (tmp_path / 'torchtext' / '_extension.py').write_text(
        "raise OSError('libtorchtext.so: undefined symbol: _ZN3c10fake')\n"
    )
    out = _run(PROBE, tmp_path)
    assert out['status']['used'] == 'compat' and 'undefined symbol' in out['status']['reason']
    assert out['base'] == 'deepseq_nb.torchtext_compat' and not out['fake']


def test_real_torchtext_kept_when_it_loads(tmp_path):
    # a working torchtext (here a minimal fake one) must be used as it is, not replaced
    (tmp_path/'torchtext').mkdir()
    (tmp_path/'torchtext'/'__init__.py').write_text("")
    (tmp_path/'torchtext'/'vocab.py').write_text(textwrap.dedent("""
        FAKE = True
        from deepseq_nb.torchtext_compat import Vocab as _V, vocab as _v
        class Vocab(_V): pass
        def vocab(*a, **k): return Vocab(_v(*a, **k))
    """))
    out = _run(PROBE, tmp_path)
    assert out['status'] == {'used': 'torchtext', 'reason': None}
    assert (
        out['fake'] and out['base'] == 'torchtext.vocab' and out['itos'] == ['<pad>', '<cls>', '<eoc>', 'CD3E', 'MS4A1']
    )


def _official_layout(enc: E.Encoder, d: Path) -> int:
    "Write `enc` as the released checkpoints look, by hand: flash-attn names, specials last in vocab.json, extra args."
    d.mkdir(parents=True)
    genes = [t for t in enc.vocab.get_itos() if t not in E.SPECIAL_TOKENS]
    old = enc.vocab.get_stoi()
    order = genes + list(E.SPECIAL_TOKENS)                       # official vocab.json: genes first, specials at the end
    (d/'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(order)}))
    perm = torch.tensor([old[t] for t in order])
    state, renamed = {}, 0
    for k, v in enc.model.state_dict().items():
        if k == 'encoder.embedding.weight': v = v[perm]
        if k.endswith('self_attn.in_proj_weight'):
            k = k.replace('self_attn.in_proj_weight', 'self_attn.Wqkv.weight')
            renamed += 1
        if k.endswith('self_attn.in_proj_bias'):
            k = k.replace('self_attn.in_proj_bias', 'self_attn.Wqkv.bias')
            renamed += 1
        state[k] = v.clone()
    torch.save(state, d/'best_model.pt')
    args = dict(
        enc.args,
        fast_transformer=True,
        USE_CLS=False,
        USE_CCE=False,
        training_tasks='both',
        data_source='/somewhere',
        mask_ratio=[0.25, 0.5, 0.75],
        nheads=enc.args['nheads'],
        embsize=enc.args['embsize'],
    )
    (d/'args.json').write_text(json.dumps(args))
    return renamed


@pytest.fixture(scope='module')
def wang():
    return load_dataset('pancreas_wang')


@pytest.fixture(scope='module')
def random_encoder(wang):
    return E.new_encoder(
        E.make_vocab(list(wang.var_names)), d_model=32, nlayers=2, nhead=4, d_hid=64, max_len=64, seed=3
    )


def test_flash_named_official_layout_loads_identically(tmp_path, random_encoder, wang):
    renamed = _official_layout(random_encoder, tmp_path/'scGPT_like')
    assert renamed == 2 * random_encoder.args['nlayers']
    loaded = E.load_scgpt(tmp_path/'scGPT_like')
    assert loaded.info['missing'] == [] and loaded.info['unexpected'] == []
    assert loaded.vocab['<pad>'] == len(loaded.vocab) - 3 and loaded.pad_id != random_encoder.pad_id
    # the same cells tokenised with each vocabulary give bit-identical embeddings (max_len keeps every gene: the seeded
    # draw of genes depends on token ids, which differ between the two vocabularies)
    a = E.embed(wang, random_encoder, max_len=256, copy=True, progress=False).obsm['X_scgpt']
    b = E.embed(wang, loaded, max_len=256, copy=True, progress=False).obsm['X_scgpt']
    np.testing.assert_array_equal(a, b)
    # and the attention weights are exactly the original ones under torch's names
    sa, sb = random_encoder.model.state_dict(), loaded.model.state_dict()
    for k in sa:
        if 'self_attn' in k or 'linear' in k: assert torch.equal(sa[k], sb[k]), k


def test_checkpoint_errors_say_what_and_what_to_do(tmp_path, random_encoder):
    with pytest.raises(FileNotFoundError, match='does not exist.*pretrain_encoder'):
        E.load_scgpt(tmp_path/'nowhere')
    (tmp_path/'partial').mkdir(); (tmp_path/'partial'/'args.json').write_text('{}')
    with pytest.raises(
        FileNotFoundError, match=r'lacks best_model\.pt, vocab\.json\. An scGPT checkpoint directory holds'
    ):
        E.load_scgpt(tmp_path/'partial')
    good = E.save_scgpt(random_encoder, tmp_path/'good')
    bad = tmp_path/'truncated'; bad.mkdir()
    for f in E.FILES: (bad/f).write_bytes((good/f).read_bytes())
    (bad/'best_model.pt').write_bytes((good/'best_model.pt').read_bytes()[:2000])
    with pytest.raises(ValueError, match='could not be read as PyTorch weights.*truncated'):
        E.load_scgpt(bad)
    (bad/'best_model.pt').write_bytes((good/'best_model.pt').read_bytes())
    (bad/'vocab.json').write_text('{"CD3E": 0,')
    with pytest.raises(ValueError, match='not valid JSON.*gene → index'):
        E.load_scgpt(bad)
    stoi = json.loads((good/'vocab.json').read_text()); stoi['EXTRA_GENE'] = len(stoi)
    (bad/'vocab.json').write_text(json.dumps(stoi))
    with pytest.raises(ValueError, match='do not belong together'):
        E.load_scgpt(bad)
    (bad/'vocab.json').write_text((good/'vocab.json').read_text())
    state = torch.load(good/'best_model.pt', weights_only=True)
    torch.save({k: v for k, v in state.items() if 'layers.0.linear1' not in k}, bad/'best_model.pt')
    with pytest.raises(ValueError, match='lacks 2 encoder weights'):
        E.load_scgpt(bad)
    (bad/'args.json').write_text(json.dumps({'embsize': 32}))
    with pytest.raises(ValueError, match='lacks nheads, d_hid, nlayers'):
        E.load_scgpt(bad)


def test_bad_input_is_refused_clearly(random_encoder, wang):
    import anndata as ad, scanpy as sc
    scaled = wang.copy(); sc.pp.scale(scaled)
    with pytest.raises(ValueError, match="negative values.*scaled.*adata.raw.to_adata"):
        E.embed(scaled, random_encoder, progress=False)
    ids = ad.AnnData(np.ones((2, 2), np.float32), var=pd.DataFrame(index=['ENSG00000075624', 'ENSG00000105374']))
    with pytest.raises(ValueError, match="None of the 2 genes is in the encoder's vocabulary.*gene_col="):
        E.embed(ids, random_encoder, progress=False)
    with pytest.raises(KeyError, match="Layer 'counts' not found"):
        E.embed(wang, random_encoder, layer='counts', progress=False)


def test_pretraining_and_embedding_are_deterministic(wang):
    a = P.pretrain_encoder(**TINY, progress=False)
    b = P.pretrain_encoder(**TINY, progress=False)
    c = P.pretrain_encoder(**{**TINY, 'seed': 1}, progress=False)
    sa, sb, sc_ = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc_[k]) for k in sa)
    assert (
        a.info['pretrain']['loss'] == b.info['pretrain']['loss']
        and a.info['pretrain']['val'] == b.info['pretrain']['val']
    )
    e1 = E.embed(wang, a, copy=True, progress=False).obsm['X_scgpt']
    e2 = E.embed(wang, b, copy=True, progress=False).obsm['X_scgpt']
    np.testing.assert_array_equal(e1, e2)
    assert torch.get_num_threads() >= 1  # threads restored, not left at the pretraining value by accident


def test_cached_pretraining_is_safe_in_parallel(tmp_path):
    code = f"""
        import json, deepseq_nb.pretrain as P
        e = P.pretrained_encoder({str(tmp_path)!r}, progress=False, **{TINY!r})
        print(json.dumps(dict(dir=str(e.directory), first=float(e.model.encoder.embedding.weight[5, 0]))))
    """
    procs = [
        subprocess.Popen(
            [sys.executable, '-c', textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    res = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert res[0] == res[1]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in entries if not n.endswith('.lock')]) == 1, entries   # one encoder, no leftover temp dirs
