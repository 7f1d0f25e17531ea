"""Evaluations and benchmarks behind the ``inf-mllm`` CLI.

* :mod:`.engine` — model loading, one policy's cache, chunked feeding with per-token NLL, greedy decoding.
* :mod:`.ppl` — streaming perplexity; :mod:`.retrieval` — line retrieval; :mod:`.rounds` — multi-round QA;
  :mod:`.needle` — needle in a haystack of prose (length x depth grid).
* :mod:`.stream_bench` — decode latency / memory vs tokens; :mod:`.ops_bench` — operator timings.
"""
