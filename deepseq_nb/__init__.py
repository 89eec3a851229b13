"""Cell-type annotation of single-cell RNA-seq with LLMs and a scGPT-based agent, as reproducible nbdev notebooks

Modules:

- `deepseq_nb.backends`: Cell-type annotators behind one interface: the offline knowledge base, Ollama, OpenAI (with web search) and a consensus of several — with a persistent answer cache, resumable runs, retries, rate limits and cost.
- `deepseq_nb.evaluate`: One scorer for every annotator: label agreement (GPTCelltype's 1 / 0.5 / 0 rule on Cell Ontology terms), DeepSeq's soft score, marker validation, and cell- and cluster-level metrics.
- `deepseq_nb.local_llm`: A real small model in the loop: Gemma 3 270M from PyPI, served by llama.cpp on loopback, asked through the OpenAI client as the `llamacpp:` backend, with completion-style few-shot prompts for models without a chat template."""

__version__ = "0.1.0"
