"""Ladder adaptation on Ray Train (`adapt/`), on the session's real three-node Ray cluster.

The model: the session's tiny random Llama with a byte-level tokenizer, first trained for a few
dozen steps on the Python tutorial's text (transformers' own training loop) so that it has
something to lose when its upper layers are laddered. One uninterrupted two-worker run is the
reference: it must lower the distillation loss and the held-out perplexity; a run whose worker
is killed, then interrupted with Ctrl-C and resumed, must end with the very same weights (nothing
lost, same data order). The saved folder must give the trained model's logits at TP=1
and TP=2 and load in transformers; every data error gets a message naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapt.data import DEFAULT_DATA, DataError, prepare, read_documents, split, step_rows
from adapt.train import AdaptError, AdaptOptions, read_progress, run_adapt
from ladder.loaders import CheckpointError, open_checkpoint

PLAN = "ladder"  # every layer laddered: the tiny parent loses ~1.8x perplexity
# a step of the tiny model takes ~0.1-0.3 s here: slow enough for an interrupt to land mid-run
SETTINGS = dict(residual=PLAN, steps=40, batch=8, seq_len=256, lr=2e-3, warmup=4,
                eval_every=10, checkpoint_every=5, eval_rows=4, workers=2, seed=3)


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The Python tutorial's reStructuredText (from the default data the set-up installs)."""
    src = DEFAULT_DATA / "tutorial"
    assert src.is_dir(), f"{src} is missing: run `make setup` (Debian's python3.11-doc)"
    return src


@pytest.fixture(scope="module")
def parent(tiny_llama, corpus, tmp_path_factory):
    """tiny_llama plus a byte-level tokenizer, trained 120 steps (standard residual)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("adapt_parent")
    raw, alphabet = _byte_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=alphabet[2]).save_pretrained(path)
    rows = prepare(corpus, open_checkpoint_tokenizer(path), seq_len=128, max_seq_len=512).train
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        x = torch.from_numpy(rows[torch.randint(len(rows), (8,), generator=g)]).long()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(path)
    return path


def open_checkpoint_tokenizer(folder: Path):
    from ladder.tokenizer import Tokenizer
    return Tokenizer.from_folder(folder)


def _options(parent, corpus, out: Path, **kw) -> AdaptOptions:
    return AdaptOptions(model=str(parent), data=str(corpus), out=str(out), **{**SETTINGS, **kw})


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of a run's final checkpoint."""
    last = max(r["checkpoint"] for r in read_progress(run_dir) if "checkpoint" in r)
    return torch.load(Path(last) / "state.pt", weights_only=True)["params"]


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in read_progress(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def reference(ray_cluster, parent, corpus, tmp_path_factory):
    """One uninterrupted two-worker run: (options, summary)."""
    o = _options(parent, corpus, tmp_path_factory.mktemp("adapt_ref") / "out")
    summary = run_adapt(o)
    yield o, summary
    shutil.rmtree(Path(o.out).parent, ignore_errors=True)


def test_two_workers_lower_the_loss_and_held_out_perplexity(reference):
    o, summary = reference
    recs = read_progress(o.run_dir)
    steps = _steps(o.run_dir)
    assert [r["step"] for r in steps] == list(range(1, o.steps + 1))
    assert all(len(set(r["pids"])) == 2 for r in steps)  # two data-parallel workers
    first = sum(r["kl"] for r in steps[:5]) / 5
    last = sum(r["kl"] for r in steps[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    before = next(r for r in recs if r.get("step") == 0)  # evaluated before training
    assert before["ppl_ratio"] > 1.2  # laddering hurt the parent ...
    assert summary["ppl"] < before["ppl"]  # ... and distillation recovers
    assert summary["held_out_kl"] < 0.7 * before["held_out_kl"]
    conf = json.loads((Path(o.out) / "config.json").read_text())
    assert conf["ladder_layers"] == [0, 1, 2, 3] and conf["ladder_residual"] == PLAN
    assert conf["ladder_adapted"]["parent"] == o.model


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _same_run(o: AdaptOptions, reference) -> None:
    """Finished at the last step, with the reference's weights and data order."""
    ref, _ = reference
    ref_rows = {r["step"]: r["rows"] for r in _steps(ref.run_dir)}
    got = _steps(o.run_dir)
    assert max(r["step"] for r in got) == o.steps
    assert all(r["rows"] == ref_rows[r["step"]] for r in got)
    a, b = _trained(o.run_dir), _trained(ref.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_a_killed_worker_then_ctrl_c_then_resume_finish_the_same_run(ray_cluster, parent, corpus,
                                                                      reference, tmp_path):
    """One run through both faults: a worker killed after the first checkpoint is replaced and
    the run goes on from it; Ctrl-C after the next checkpoint stops the driver (exit 130); the
    same command resumes from that checkpoint. The result is the uninterrupted run's."""
    o = _options(parent, corpus, tmp_path / "out")
    cmd = [sys.executable, "-m", "ladder.cli", "adapt", "--model", o.model, "--data", o.data,
           "--out", o.out, "--address", ray_cluster.address]
    for k, v in SETTINGS.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        first = _wait_for(lambda: next((r for r in read_progress(o.run_dir)
                                        if "checkpoint" in r), None), 120, "a checkpoint")
        killed = first["pids"][1]
        os.kill(killed, signal.SIGKILL)  # a worker of this test's own cluster

        def checkpoint_after_the_failure():
            recs = read_progress(o.run_dir)
            fail = next((i for i, r in enumerate(recs) if r.get("event") == "worker_failure"),
                        None)
            return fail is not None and any("checkpoint" in r for r in recs[fail:])

        _wait_for(checkpoint_after_the_failure, 180, "a checkpoint after the failure")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted; the same command resumes the run" in out
    recs = read_progress(o.run_dir)
    fail = next(i for i, r in enumerate(recs) if r.get("event") == "worker_failure")
    after = [r for r in recs[fail:] if "pids" in r]
    assert after and all(killed not in r["pids"] for r in after)  # a new worker took over
    done = [r["step"] for r in recs if "checkpoint" in r]
    assert max(done) < o.steps, "the run ended before the interrupt landed"
    assert not Path(o.out).exists()

    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming {o.run_dir} from its checkpoint at step {max(done)}" in res.stdout
    starts = [i for i, r in enumerate(read_progress(o.run_dir)) if r.get("event") == "start"]
    first_after = next(r for r in read_progress(o.run_dir)[starts[-1]:] if "loss" in r)
    assert first_after["step"] == max(done) + 1  # nothing redone from scratch, nothing skipped
    _same_run(o, reference)


def test_saved_folder_round_trips_at_tp1_and_tp2(reference):
    from transformers import LlamaForCausalLM

    from adapt.distill import build_pair
    from ladder.engine.local import LocalTPGroup
    from ladder.loaders.shard import unshard
    from ladder.options import GroupOptions
    o, _ = reference
    base = open_checkpoint(o.model)
    _, student = build_pair(base, base.plan(PLAN))
    with torch.no_grad():
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.copy_(_trained(o.run_dir)[n])
    rows = [[5, 70, 71, 72, 33, 90, 100, 7], [1, 2, 3, 80, 81, 82]]
    with torch.no_grad():
        want = [student(torch.tensor([r]))[0] for r in rows]
    for tp in (1, 2):
        with LocalTPGroup(GroupOptions(model=o.out, tp=tp, max_seq=64)) as g:
            assert g.info.residual_plan == PLAN and g.info.adapted is True
            for w, got in zip(want, g.logits(rows)):
                torch.testing.assert_close(got, w, rtol=0, atol=1e-4)
    hf = LlamaForCausalLM.from_pretrained(o.out).state_dict()
    ours = unshard(dict(student.state_dict()), base.config)
    for k, v in ours.items():
        assert torch.equal(hf[k], v), k


def test_contradicting_residual_is_refused(reference, capsys):
    from ladder.cli import main
    o, _ = reference
    ck = open_checkpoint(o.out)
    assert ck.plan(None) == ck.plan(PLAN) == ck.recorded_plan
    with pytest.raises(CheckpointError, match=r"residual 'standard' contradicts the checkpoint, "
                       r"whose weights were adapted to run 'ladder'"):
        ck.plan("standard")
    assert main(["generate", "--model", o.out, "--residual", "ladder:1-3", "--prompt", "x",
                 "--max-tokens", "2"]) == 1
    assert "contradicts the checkpoint" in capsys.readouterr().err
    assert main(["eval", "--model", o.out, "--residual", "standard", "--data", o.data]) == 2
    assert "contradicts the checkpoint" in capsys.readouterr().err
    with pytest.raises(AdaptError, match="already adapted"):
        run_adapt(AdaptOptions(model=o.out, data=o.data, out=o.out + "-again", **SETTINGS))


def test_eval_compares_with_the_parent(reference, tmp_path, capsys):
    from adapt.evaluate import evaluate
    from ladder.cli import main
    o, _ = reference
    prompts = ("def f(x):", "The tutorial")
    kw = dict(data=o.data, seq_len=128, rows=4, prompts=prompts, max_tokens=6)
    adapted = evaluate(o.out, **kw)
    zero_shot = evaluate(o.model, PLAN, **kw)
    assert adapted["parent"] == o.model and adapted["adapted"]
    assert adapted["parent_ppl"] == pytest.approx(zero_shot["parent_ppl"])
    assert adapted["ppl_ratio"] < zero_shot["ppl_ratio"]
    assert adapted["held_out_kl"] < zero_shot["held_out_kl"]
    assert 0 <= adapted["top1"] <= 1 and 0 <= adapted["greedy_agree"] <= 1
    js = tmp_path / "eval.json"
    assert main(["eval", "--model", o.out, "--data", o.data, "--seq-len", "128", "--rows", "2",
                 "--max-tokens", "4", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out and json.loads(js.read_text())["residual"] == PLAN


def test_ladder_serve_serves_the_adapted_folder(reference):
    """`ladder serve` on the folder (its own local Ray): /v1/models reports the recorded plan
    and `adapted`; the served greedy text is the TP=1 group's; TP=2 gives TP=1's tokens."""
    from bench.adapted_serve import check
    o, _ = reference
    r = check(Path(o.out), "def f(x):", max_tokens=8, chat=False)
    entry = r["served"]["model_entry"]
    assert entry["id"] == "adapted" and entry["residual_plan"] == PLAN
    assert entry["adapted"] is True and r["served"]["exit_code"] == 0
    assert r["served_is_tp1"] and r["tp2_equals_tp1"] and len(r["tp1_tokens"]) == 8
    assert r["parent"] == o.model and r["parent_text"] is not None


def test_the_readme_example_and_its_answer_rule():
    from adapt.evaluate import PROMPTS, README_PROMPT
    from bench.adapted_serve import answers_readme_prompt
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f'--prompt "{README_PROMPT}"' in readme and PROMPTS[0] == README_PROMPT
    # the parent SmolLM2-135M's and the adapted ladder:24-29's greedy answers (2026-11-26)
    assert answers_readme_prompt("Parallel computing is a technique used to perform multiple "
                                 "tasks simultaneously on multiple processors or devices.")
    assert answers_readme_prompt("... using multiple processing units or threads to execute "
                                 "multiple tasks concurrently.")
    for wrong in ("Parallel computing is a mathematical concept in physics that describes the "
                  "relationship between tensors.", "It runs tasks one after another.",
                  "Things happen at the same time."):
        assert not answers_readme_prompt(wrong)


def test_data_order_is_a_function_of_seed_and_step():
    a = [step_rows(s, 4, 10, seed=1) for s in range(5)]
    assert [list(x) for x in a] == [list(step_rows(s, 4, 10, seed=1)) for s in range(5)]
    first_epoch = [int(i) for x in a[:2] for i in x] + [int(i) for i in a[2][:2]]
    assert sorted(first_epoch) == list(range(10))  # every row once, then the next epoch


def test_data_errors(tmp_path, parent):
    tok = open_checkpoint_tokenizer(parent)

    def err(folder, match, **kw):
        with pytest.raises(DataError, match=match):
            prepare(folder, tok, **{"seq_len": 16, "max_seq_len": 512, **kw})

    err(tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such folder")
    (tmp_path / "empty").mkdir()
    err(tmp_path / "empty", "the folder is empty")
    d = tmp_path / "bin"
    d.mkdir()
    (d / "a.txt").write_text("some text " * 50)
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    err(d, f"{d / 'image.png'}: not a text file \\(it contains NUL bytes\\)")
    (d / "image.png").write_bytes("caf\u00e9".encode("latin-1"))
    err(d, f"{d / 'image.png'}: not a text file \\(not UTF-8 at byte 3\\)")
    j = tmp_path / "jsonl"
    j.mkdir()
    (j / "d.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    err(j, f"{j / 'd.jsonl'}:2: not valid JSON")
    (j / "d.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    err(j, f"{j / 'd.jsonl'}:2: expected an object with a string 'text' field")
    w = tmp_path / "white"
    w.mkdir()
    (w / "a.txt").write_text("  \n")
    err(w, "no text in any of its 1 files")
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("only one document")
    err(one, "one document cannot be split")
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        (small / f"{i}.txt").write_text("tiny")
    err(small, "holds fewer tokens than one row of --seq-len 16")
    err(d, "--seq-len 1024 is past the context of the model \\(512 tokens\\)", seq_len=1024)
    # JSONL lines are documents of their own, split apart by the held-out hash
    (j / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n"
                                       for i in range(40)))
    docs = read_documents(j)
    assert len(docs) == 40 and docs[0].name == "d.jsonl:1"
    train, held = split(docs, 0.1)
    assert held and not {d.name for d in train} & {d.name for d in held}


def test_adapt_command_reports_bad_input(ray_cluster, parent, tmp_path, capsys):
    from ladder.cli import main
    (tmp_path / "empty").mkdir()
    args = ["adapt", "--model", str(parent), "--out", str(tmp_path / "o"), "--steps", "2"]
    assert main(args) == 2  # the default plan, ladder:24-29, does not fit 4 layers
    assert "layer 29 out of range (the model has 4 layers" in capsys.readouterr().err
    args += ["--residual", PLAN]
    assert main(args + ["--data", str(tmp_path / "empty")]) == 2
    assert f"ladder adapt: {tmp_path / 'empty'}: the folder is empty" in capsys.readouterr().err
    assert main(args + ["--data", str(DEFAULT_DATA / "tutorial"), "--seq-len", "4096"]) == 2
    assert "--seq-len 4096 is past the context" in capsys.readouterr().err
    assert main(args + ["--residual", "standard"]) == 2
    assert "adaptation needs a ladder plan" in capsys.readouterr().err
