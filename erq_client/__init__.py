"""A small client for the erq REST API, for people (`erq submit`, `erq jobs`) and scripts.

    from erq_client import ErqClient
    client = ErqClient("http://127.0.0.1:8000")            # the key from ERQ_API_KEY
    job = client.submit({"model": "deit_small", "dataset": "/data/imagenet", "w_bits": 4})
    job = client.wait(job["id"], on_event=print)          # follows the job's event stream
    client.download(job["id"], "runs/deit_small_w4a4")    # the result folder, checked against the sha256s

It imports neither torch nor the engine: only httpx, and the light job schema (erq_core.config).
"""
from erq_client.client import ErqClient, ErqClientError, Event

__all__ = ["ErqClient", "ErqClientError", "Event"]
