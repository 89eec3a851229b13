"""Shared test fixtures. The loopback stand-in for the Ollama and OpenAI HTTP APIs lives in tools/standin_server.py
(tests and benchmarks/llm_calls.py use it; it never feeds a figure); this is the one place that puts tools/ on the
path."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'tools'))
from standin_server import StandinServer  # noqa: E402


@pytest.fixture
def server(request):
    "A started stand-in server serving the models of the test module's `STANDIN_MODELS` (default: llama3.2:1b)."
    s = StandinServer(models=getattr(request.module, 'STANDIN_MODELS', ['llama3.2:1b'])).start()
    yield s
    s.stop()
