"""Encoder figures: pretraining time of the small scGPT encoder, embedding throughput, gene-vocabulary coverage.

Usage: python benchmarks/encoder.py [--datasets pbmc3k pancreas_xin ...] [--repeats 1] [--cached]
                                    [--memory-sizes 10000 ...]

- pretraining: `pretrain_encoder` with the settings.ini [encoder] parameters, into a temporary directory (so it is
  measured, never loaded from the cache); wall and CPU seconds, validation loss before/after (GEP + GEPC, and the GEP
  part next to the per-gene mean-bin baseline). `--cached` skips it and uses `default_encoder()` instead.
- embedding: `embed()` on each dataset with 2 torch threads, batch 64, no progress bar; best of `--repeats`;
  tokenising (gene matching + binning + padding) and the model timed apart; cells per second over the whole call.
- coverage: share of each dataset's genes in the encoder's vocabulary and in scgpt's census vocabulary (the genes of
  an official whole-human checkpoint), and how many matched through upper-casing (mouse → human).
- memory: queries per second of the reference memory at `--memory-sizes` entries (default 10^4, 10^5, 10^6), exact Flat
  vs IVF-Flat at nprobe 16 with recall@10 against Flat, in the encoder's embedding size and scGPT's 512
  (`benchmarks/memory.py` measures it, with more nprobe values; `--memory-sizes` with no value skips it).

Each section is a function returning rows; `main()` prints one table per section. Add new sections the same way.
"""
import argparse, os, tempfile, time
os.environ.setdefault('OMP_NUM_THREADS', '2'); os.environ.setdefault('NUMBA_NUM_THREADS', '2')
import warnings; warnings.filterwarnings('ignore')

BUNDLED = ['pbmc3k', 'pbmc68k_reduced', 'pancreas_xin', 'pancreas_wang', 'testis_mca']


def bench_pretraining(params: dict | None = None) -> tuple[list[dict], object]:
    "Pretrain the settings.ini small encoder from scratch in a temporary directory; one row, and the encoder."
    from deepseq_nb.pretrain import encoder_settings, pretrain_encoder, PRETRAIN_KEYS
    s = encoder_settings()
    p = {k: s[k] for k in PRETRAIN_KEYS if s.get(k, '') != ''} | (params or {})
    with tempfile.TemporaryDirectory() as d:
        enc = pretrain_encoder(**p, out_dir=d, progress=False)
    log = enc.info['pretrain']
    v0, v1 = log['val'][0], log['val'][-1]
    return [
        dict(
            model=f"{p.get('nlayers')}x{p.get('d_model')} L={p.get('max_len')}",
            cells=log['n_cells'],
            tokens=log['n_tokens'],
            epochs=p.get('epochs'),
            steps=log['steps'],
            wall_s=log['seconds'],
            cpu_s=log['cpu_seconds'],
            val_loss_before=v0['loss'],
            val_loss_after=v1['loss'],
            val_gep_after=v1['gep'],
            gep_baseline=v1['baseline_gep'],
            train_loss_first10=round(sum(log['loss'][:10]) / 10, 2),
            train_loss_last10=round(sum(log['loss'][-10:]) / 10, 2),
        )
    ], enc


def bench_embedding(
    encoder, datasets=BUNDLED, *, batch_size: int = 64, n_threads: int = 2, repeats: int = 1
) -> list[dict]:
    "Throughput of `embed` per dataset (best of `repeats`), with tokenising and the model timed apart."
    from deepseq_nb.data import load_dataset
    from deepseq_nb.encoder import embed, tokenize, cell_embeddings, torch_threads
    rows = []
    for name in datasets:
        a = load_dataset(name)
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter(); tok = tokenize(a, encoder); t1 = time.perf_counter()
            encoder.model.eval()
            with torch_threads(n_threads): cell_embeddings(encoder, tok, batch_size=batch_size)
            t2 = time.perf_counter()
            embed(a, encoder, batch_size=batch_size, n_threads=n_threads, progress=False)
            t3 = time.perf_counter()
            r = dict(
                dataset=name,
                cells=a.n_obs,
                genes=a.n_vars,
                mean_tokens=round(float(tok.lengths.float().mean()), 1),
                tokenise_s=round(t1 - t0, 2),
                model_s=round(t2 - t1, 2),
                embed_s=round(t3 - t2, 2),
                cells_per_s=round(a.n_obs / (t3 - t2), 1),
            )
            best = r if best is None or r['embed_s'] < best['embed_s'] else best
        rows.append(best)
    return rows


def coverage_rows(encoder, datasets=BUNDLED) -> list[dict]:
    "Gene coverage of each dataset by the encoder's vocabulary and by scgpt's census (official whole-human) vocabulary."
    from deepseq_nb.data import load_dataset
    from deepseq_nb.encoder import gene_coverage, match_genes, scgpt_vocab
    census = scgpt_vocab()
    rows = []
    for name in datasets:
        a = load_dataset(name)
        ours, off = gene_coverage(match_genes(a, encoder.vocab)), gene_coverage(match_genes(a, census))
        rows.append(
            dict(
                dataset=name,
                genes=a.n_vars,
                ours=ours['coverage'],
                ours_by_case=ours['n_by_case'],
                census=off['coverage'],
                census_by_case=off['n_by_case'],
                census_share_by_case=off['share_by_case'],
            )
        )
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    "Print rows (dicts with the same keys) as an aligned table under `title`."
    if not rows: return
    cols = list(rows[0])
    w = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(f"\n{title}\n" + '  '.join(c.rjust(w[c]) for c in cols))
    for r in rows: print('  '.join(str(r[c]).rjust(w[c]) for c in cols), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--datasets', nargs='+', default=BUNDLED)
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--cached', action='store_true', help='use default_encoder() instead of measuring pretraining')
    p.add_argument(
        '--memory-sizes', nargs='*', type=int, default=[10**4, 10**5, 10**6], help='memory entries (none: skip)'
    )
    a = p.parse_args()
    import torch
    from deepseq_nb.pretrain import default_encoder
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, 2 torch threads")
    if a.cached: enc = default_encoder(progress=False)
    else:
        rows, enc = bench_pretraining()
        print_table('Pretraining the small encoder (settings.ini [encoder])', rows)
    print_table(f'Embedding throughput ({enc!r})', bench_embedding(enc, a.datasets, repeats=a.repeats))
    print_table(
        'Gene coverage (share of genes in the vocabulary; by_case = matched upper-cased)',
        coverage_rows(enc, a.datasets),
    )
    if a.memory_sizes:
        import sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from memory import memory_benchmark

        print(
            "\nMemory: queries/s of 1,000 queries as one batch, Flat vs IVF-Flat (nprobe 16), recall@10 vs Flat, 2 "
            "faiss threads"
        )
        memory_benchmark(a.memory_sizes, dims=sorted({enc.d_model, 512}), nprobes=(16,), threads=2)


if __name__ == '__main__': main()
