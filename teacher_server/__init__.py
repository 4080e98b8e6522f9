"""teacher_server: the standalone teacher log-prob service of opd.

    python -m teacher_server --model PATH [--port 8000] [--api-key-file FILE] ...

`protocol.py` is the wire schema (the only module other packages may import,
besides what `engine.py` shares with the samplers: `cpu_engine_setup` and the
engine-argument checks); `engine.py` wraps vLLM's AsyncLLM, `server.py` is the aiohttp front-end,
`metrics.py` its Prometheus metrics, `__main__.py` the command line.
"""
