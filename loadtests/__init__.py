"""Load tests for attnserve: Locust scenarios (locustfile.py), the headless report command
(`python -m loadtests`, run.py/report.py) and vLLM's own serving benchmark (vllm_bench.py)."""
