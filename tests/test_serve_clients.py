"""Real clients against one `ladder serve` (the README's main command, its own local Ray, the
tiny chat model, an API key):

- the README's monitoring path: Prometheus started with dashboards/prometheus.yml exactly as
  shipped finds the server (the service-discovery file its local Ray's head wrote) and a
  serving panel's query returns the server's series;
- `bench.serve_load --url` (the project's serving benchmark client) drives it with a
  shared-prefix workload: every request completes and the later ones find the system prompt in
  the prefix cache, as the responses' usage reports it;
- lm-evaluation-harness's `local-completions` model runs a loglikelihood (multiple-choice) task
  of our own, from a local JSONL file, through the completions API (token ids, `echo` with
  `logprobs`); every loglikelihood it computes equals transformers' for the same tokens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch
import yaml
from test_metrics import query, running_prometheus

from bench.serve_proc import ladder_serve, wait_ready, write_config
from dashboards.spec import DASHBOARDS
from ladder.links.factory import free_port

KEY = "sk-clients"
MODEL = "tiny-clients"
DOCS = [{"question": "The capital of France is", "choices": ["Paris", "Berlin", "Rome"],
         "answer": 0},
        {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0},
        {"question": "The sky on a clear day is", "choices": ["blue", "green", "red"],
         "answer": 0}]
SHIPPED = Path(__file__).resolve().parents[1] / "dashboards" / "prometheus.yml"


@pytest.fixture(scope="module")
def server(tiny_chat, tmp_path_factory):
    """`ladder serve` on the tiny chat model: (URL, the time it started); Ctrl-C at the end,
    which must exit 0."""
    port = free_port()
    cfg = write_config(tmp_path_factory.mktemp("serve"), port, model=str(tiny_chat),
                       model_name=MODEL, residual="standard", max_seq=256, n_slots=4,
                       api_keys=[KEY])
    started = time.time()
    with ladder_serve(cfg) as proc:
        wait_ready(proc, 300)
        yield f"http://127.0.0.1:{port}", started
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]


def test_the_readme_monitoring_path(server, tmp_path):
    url, started = server
    sd = Path(yaml.safe_load(SHIPPED.read_text())["scrape_configs"][0]["file_sd_configs"][0]
              ["files"][0])
    assert sd.stat().st_mtime >= started - 1, f"{sd} is not this server's"
    panel = next(q.expr for p in DASHBOARDS["serving"][2] for q in p.queries
                 if "ladder_generation_tokens_total" in q.expr)
    expr = panel.replace("$model", MODEL).replace("$tp", ".*").replace(
        "$interconnect", ".*").replace("$__rate_interval", "2m")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with running_prometheus(SHIPPED, tmp_path / "data") as prom:
        result, deadline = [], time.monotonic() + 120
        while not result and time.monotonic() < deadline:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=8,
                                      extra_body={"ignore_eos": True})
            time.sleep(3)
            result = [r for r in query(prom, expr) if float(r["value"][1]) > 0]
    assert result, f"no data for the panel query {expr} through {SHIPPED}"
    assert {r["metric"].get("model") for r in result} == {MODEL}


def test_serve_load_drives_ladder_serve_with_a_shared_prefix(server):
    url, _ = server
    run = subprocess.run(
        [sys.executable, "-m", "bench.serve_load", "--url", url + "/v1", "--model", MODEL,
         "--api-key", KEY, "--shared-prefix", "60", "--clients", "3", "--requests", "6",
         "--tokens", "6"], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])["load"]
    assert res["completed"] == 6 and res["failed"] == 0 and res["tokens"] == 36, res
    # three clients start together (each prefills the prompt itself), the next three find it
    assert 0 < res["cached_tokens"] < res["prompt_tokens"] and res["cached_share"] > 0.2, res


def write_task(folder: Path) -> None:
    (folder / "task.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "ladder_tiny.yaml").write_text(f"""task: ladder_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "task.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")


def reference_loglikelihood(hf, tok, context: str, continuation: str) -> float:
    """What the harness asks (its own split of the text into context and continuation
    tokens), computed with transformers."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_lm_eval_loglikelihood_task(server, tiny_chat, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import LlamaForCausalLM

    from ladder.tokenizer import Tokenizer
    url, _ = server
    write_task(tmp_path)
    for k, v in {"OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_CACHE": str(tmp_path / "datasets")}.items():
        monkeypatch.setenv(k, v)
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args={
            "base_url": url + "/v1/completions", "model": MODEL, "tokenizer": str(tiny_chat),
            "tokenized_requests": True, "num_concurrent": 2, "max_retries": 1},
        tasks=["ladder_tiny"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    result = out["results"]["ladder_tiny"]
    assert result["sample_len"] == len(DOCS) and 0 <= result["acc,none"] <= 1
    hf = LlamaForCausalLM.from_pretrained(tiny_chat, torch_dtype=torch.float32).eval()
    tok = Tokenizer.from_folder(tiny_chat)
    samples = out["samples"]["ladder_tiny"]
    assert len(samples) == len(DOCS)
    for s in samples:
        for (context, continuation), [(ll, _)] in zip(s["arguments"], s["resps"]):
            assert ll == pytest.approx(reference_loglikelihood(hf, tok, context, continuation),
                                       abs=1e-3), (context, continuation)
