"""The HTTP API (`deploy.api`) over a local TP=2 group of the tiny chat model, with an API key,
served by uvicorn on a thread of the test process: no Ray (test_hardening, test_api_fields)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_SEQ = 256
MAX_PROMPT_CHARS = 50_000
SETTINGS = {"model_name": "tiny-chat", "tp": 2, "residual": "standard", "n_slots": 4,
            "max_seq": MAX_SEQ, "api_keys": [KEY], "queue_limit": 16,
            "max_prompt_chars": MAX_PROMPT_CHARS}


@contextmanager
def serving_locally(model_path):
    """The API's base URL while it serves `model_path`; the group and server end after."""
    import uvicorn

    from deploy.api import OpenAIServer
    from deploy.app import build_api
    from deploy.config import ServerConfig
    from ladder.engine.local import LocalTPGroup
    from ladder.links.factory import free_port
    cfg = ServerConfig.from_dict({**SETTINGS, "model": str(model_path)})
    port = free_port()
    with LocalTPGroup(cfg.group_options()) as group:
        server = uvicorn.Server(uvicorn.Config(build_api(OpenAIServer(group, cfg)),
                                               host="127.0.0.1", port=port, log_level="warning"))
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        try:
            deadline = time.monotonic() + 60
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            t.join(timeout=30)
