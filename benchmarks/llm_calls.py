"""Calls and wall time of LLM annotation: batched vs per-cluster prompts, concurrency 1/4/8, and a cached rerun.

Runs the real `ollama` client against the loopback stand-in server of tools/standin_server.py, which answers every
request after a fixed latency (200 ms by default). It measures the client-side machinery (batching, thread pool,
cache) only; the answers are scripted and are not reported. Usage:

    .venv/bin/python benchmarks/llm_calls.py [--clusters 50] [--latency 0.2]
"""
import argparse, sys, tempfile, time
from pathlib import Path

from deepseq_nb.prompts import make_queries
from deepseq_nb.backends import get_backend

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))  # so that the import below finds tools/standin_server.py
from standin_server import StandinServer, Reply, ollama_chat, label_by_first_marker, last_user_text  # noqa: E402


def run(server, cache_dir, queries, batch_size, concurrency):
    "(requests, cache hits, wall seconds, clusters labelled) of one annotate run."
    server.reset()
    b = get_backend('ollama:bench-model', host=server.url, cache=cache_dir, batch_size=batch_size,
                    concurrency=concurrency, progress=False, timeout=30)
    t0 = time.perf_counter()
    res = b.annotate(queries)
    wall = time.perf_counter() - t0
    assert res.stats.calls == len(server.calls('/api/chat'))
    return res.stats.calls, res.stats.hits, wall, sum(a.label != 'Unknown' for a in res)


def main(n_clusters=50, latency=0.2):
    genes = [f'GENE{i}' for i in range(n_clusters)]
    queries = make_queries(
        {str(i): [g, f'AUX{i}A', f'AUX{i}B', f'AUX{i}C'] for i, g in enumerate(genes)}, 'PBMC', 'human'
    )
    answer = label_by_first_marker({g: f'type {i}' for i, g in enumerate(genes)})
    rows = []
    with StandinServer(models=['bench-model'], latency=latency) as server:
        server.script = lambda path, body: Reply(200, ollama_chat(answer(last_user_text(body))))
        for mode, bs in [('batched (30/prompt)', 30), ('per-cluster', 1)]:
            for conc in (1, 4, 8):
                with tempfile.TemporaryDirectory() as d:
                    calls, hits, wall, ok = run(server, Path(d), queries, bs, conc)
                    rows.append((mode, conc, 'cold', calls, hits, wall, ok))
                    calls, hits, wall, ok = run(server, Path(d), queries, bs, conc)
                    rows.append((mode, conc, 'cached rerun', calls, hits, wall, ok))
    print(f"{n_clusters} clusters, stand-in Ollama server with {latency*1000:.0f} ms latency per request (loopback)\n")
    print(f"{'prompts':<20} {'conc':>4} {'run':<13} {'requests':>8} {'hits':>5} {'wall s':>7} {'labelled':>8}")
    for mode, conc, kind, calls, hits, wall, ok in rows:
        print(f"{mode:<20} {conc:>4} {kind:<13} {calls:>8} {hits:>5} {wall:>7.2f} {ok:>8}")
    return rows


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--clusters', type=int, default=50)
    ap.add_argument('--latency', type=float, default=0.2)
    a = ap.parse_args()
    main(a.clusters, a.latency)
