"""Qwen2 (biases on q/k/v) and Mistral (a sliding window shorter than the prompts) against
transformers: logits within 1e-4 and greedy tokens equal at TP 1, 2 and 3, through the serving
path (prefill masks, the KV cache, batched decode with the native operators where they apply);
and the configuration errors that name what is not supported."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ladder.engine.local import LocalTPGroup  # noqa: E402
from ladder.engine.sampling import SamplingParams  # noqa: E402
from ladder.loaders import open_checkpoint  # noqa: E402
from ladder.model.config import ConfigError, ModelConfig  # noqa: E402
from ladder.options import GroupOptions  # noqa: E402

ATOL = 1e-4
WINDOW = 6
PROMPTS = [[5, 17, 99, 3, 42, 8, 11, 60, 61, 62, 9], [33, 2, 90, 14, 15, 16, 17, 18, 19, 4, 70,
                                                       71, 72]]
QWEN_THETA = 1e6
N = 12  # new tokens: positions up to 25, four windows past the start


def _tiny(kind: str):
    import transformers
    torch.manual_seed(3)
    common = dict(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=QWEN_THETA, use_sliding_window=False)
        hf = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random biases (they start at 0), so that they count
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return hf.eval()
    cfg = transformers.MistralConfig(**common, sliding_window=WINDOW)
    return transformers.MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def family(request, tmp_path_factory):
    hf = _tiny(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, path, hf


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False)
    return out[0, len(prompt):].tolist()


def test_the_config_reads_the_family(family):
    kind, path, _ = family
    c = open_checkpoint(path).config
    assert c.family == kind
    assert c.qkv_bias == (kind == "qwen2") and c.sliding_window == (WINDOW if kind == "mistral"
                                                                     else None)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_logits_and_greedy_tokens_equal_transformers(family, tp):
    kind, path, hf = family
    with torch.no_grad():
        want_logits = [hf(torch.tensor([p])).logits[0] for p in PROMPTS]
        want = [hf_greedy(hf, p, N) for p in PROMPTS]
    with LocalTPGroup(GroupOptions(model=str(path), tp=tp, max_seq=64)) as g:
        for a, b in zip(g.logits(PROMPTS), want_logits):
            assert (a - b).abs().max() < ATOL, kind
        got = g.generate(PROMPTS, [SamplingParams(max_tokens=N, temperature=0,
                                                  ignore_eos=True)] * len(PROMPTS))
    assert [o["tokens"] for o in got] == want, kind


@pytest.mark.parametrize("tp, fast", [(1, True), (2, True), (1, False)],
                         ids=["tp1", "tp2", "tp1-torch"])
def test_the_window_bounds_the_kv_cache(tmp_path, tp, fast):
    """Mistral with blocks of 2 and a KV cache of 12 blocks: the two sequences run to 23 and
    25 positions (24 blocks without the window) side by side, each holding its window's blocks only
    (the ones before it go back to the pool as it moves on), nothing preempted, and the greedy
    tokens still transformers' (the native kernels and torch's); at the end every block is
    back."""
    import asyncio

    from ladder.engine.build import kv_block_bytes
    hf = _tiny("mistral")
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        want = [hf_greedy(hf, p, N) for p in PROMPTS]
    opts = GroupOptions(model=str(tmp_path), tp=tp, max_seq=64, block_size=2, n_slots=2,
                        fast_kernels=fast)
    opts = GroupOptions(**{**opts.__dict__, "kv_cache_bytes": 12 * kv_block_bytes(
        opts, open_checkpoint(tmp_path).config)})
    with LocalTPGroup(opts) as g:
        got = g.generate(PROMPTS, [SamplingParams(max_tokens=N, temperature=0,
                                                  ignore_eos=True)] * len(PROMPTS))
        stats = asyncio.run(g.stats())
    assert [o["tokens"] for o in got] == want
    kv = stats["kv_cache"]
    assert kv["blocks"] == 12 and kv["preemptions"] == 0 and kv["blocks_used"] == 0, kv
    together = [s for s in stats["steps"] if s["kind"] == "decode" and s["rows"] == 2]
    assert len(together) >= N - 2, stats["steps"]  # side by side (the first step mixed)


def test_the_window_matters(tmp_path):
    """The same Mistral weights without the window give other logits past it: the tests above
    exercise the window, not a model that never reaches it."""
    hf = _tiny("mistral")
    hf.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    from ladder.loaders import load_shard
    from ladder.model.config import ResidualPlan
    from ladder.model.tp import ShardSpec
    from ladder.model.transformer import build_model
    out = []
    for window in (WINDOW, None):
        doc["sliding_window"] = window
        (tmp_path / "config.json").write_text(json.dumps(doc))
        ckpt = open_checkpoint(tmp_path)
        spec = ShardSpec.make(ckpt.config, 0, 1)
        model = build_model(ckpt.config, spec, ResidualPlan.parse("standard", 3),
                            load_shard(ckpt, spec))
        with torch.no_grad():
            out.append(model(torch.tensor([PROMPTS[0]]))[0])
    assert (out[0][:WINDOW] - out[1][:WINDOW]).abs().max() < 1e-5  # inside it: the same
    assert (out[0][WINDOW:] - out[1][WINDOW:]).abs().max() > 1e-3  # past it: not


@pytest.mark.parametrize("doc, says", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "unsupported architecture"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
])
def test_what_is_not_served_is_named(doc, says):
    base = {"vocab_size": 128, "hidden_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 6, "intermediate_size": 160}
    with pytest.raises(ConfigError, match=says) as e:
        ModelConfig.from_hf({**base, **doc}, source="x/config.json")
    assert "x/config.json" in str(e.value)


def test_a_qwen2_gguf_reads_as_its_folder(tmp_path):
    """A qwen2-architecture GGUF (llama.cpp's names and metadata keys, q/k rows as Hugging Face
    has them, the biases beside their weights): the same logits as transformers'."""
    from gguf import GGUFWriter

    from ladder.loaders import load_shard
    from ladder.loaders.gguf_file import gguf_name
    from ladder.model.config import ResidualPlan
    from ladder.model.tp import ShardSpec
    from ladder.model.transformer import build_model
    hf = _tiny("qwen2")
    c = hf.config
    w = GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(c.num_hidden_layers), w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size), w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads), w.add_rope_freq_base(QWEN_THETA)
    w.add_layer_norm_rms_eps(c.rms_norm_eps), w.add_context_length(128)
    w.add_vocab_size(c.vocab_size)
    for name, t in hf.state_dict().items():
        w.add_tensor(gguf_name(name), t.float().numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ckpt = open_checkpoint(tmp_path / "q.gguf")
    assert ckpt.config.family == "qwen2"
    spec = ShardSpec.make(ckpt.config, 0, 1)
    model = build_model(ckpt.config, spec, ResidualPlan.parse("standard", 3),
                        load_shard(ckpt, spec))
    with torch.no_grad():
        got, want = model(torch.tensor([PROMPTS[0]]))[0], hf(torch.tensor([PROMPTS[0]])).logits[0]
    assert (got - want).abs().max() < ATOL


# -- the paper's own checkpoint formats ---------------------------------------------------------
def write_dolomite(folder, llama_folder, model_type: str, head_type: str) -> None:
    """A Llama folder rewritten as dolomite-engine writes its models (31c3c09's
    model_conversion/llama.py, inverted): flat config keys, q/k/v fused per KV group into
    c_attn, c_fc = [up; gate], tied embeddings left implicit."""
    from safetensors.torch import load_file, save_file
    hf = json.loads((llama_folder / "config.json").read_text())
    w = load_file(str(llama_folder / "model.safetensors"))
    h, kv, e = hf["num_attention_heads"], hf["num_key_value_heads"], hf["hidden_size"]
    d, g = e // h, h // kv
    out = {"transformer.wte.weight": w["model.embed_tokens.weight"],
           "transformer.ln_f.weight": w["model.norm.weight"]}
    for i in range(hf["num_hidden_layers"]):
        p, o = f"model.layers.{i}.", f"transformer.h.{i}."
        q, k, v = (w[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        out[o + "attn.c_attn.weight"] = torch.cat([torch.cat([q[j * g * d:(j + 1) * g * d],
                                                              k[j * d:(j + 1) * d],
                                                              v[j * d:(j + 1) * d]])
                                                   for j in range(kv)])
        out[o + "attn.c_proj.weight"] = w[p + "self_attn.o_proj.weight"]
        out[o + "mlp.c_fc.weight"] = torch.cat([w[p + "mlp.up_proj.weight"],
                                                w[p + "mlp.gate_proj.weight"]])
        out[o + "mlp.c_proj.weight"] = w[p + "mlp.down_proj.weight"]
        out[o + "ln_1.weight"] = w[p + "input_layernorm.weight"]
        out[o + "ln_2.weight"] = w[p + "post_attention_layernorm.weight"]
    folder.mkdir()
    save_file({k: t.contiguous() for k, t in out.items()}, str(folder / "model.safetensors"))
    cfg = {"model_type": model_type, "architectures": ["LadderResidualForCausalLM"],
           "vocab_size": hf["vocab_size"], "n_embd": e, "n_layer": hf["num_hidden_layers"],
           "n_head": h, "num_key_value_heads": kv, "attention_head_type": head_type,
           "n_inner": hf["intermediate_size"], "n_positions": 128,
           "activation_function": "swiglu", "normalization_function": "rmsnorm",
           "position_embedding_type": "rope", "add_bias": False, "rope_theta": 10000.0,
           "layer_norm_epsilon": hf["rms_norm_eps"], "bos_token_id": 0, "eos_token_id": 0}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    import transformers
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("tied")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True)).save_pretrained(path)
    return path


@pytest.mark.parametrize("heads", [2, 6])  # gqa, and mha (one KV head a query head)
def test_the_papers_dolomite_ladder_model_runs_as_our_ladder_plan(tied_llama, tmp_path, heads):
    """A `ladder_residual` folder (every layer ladder) gives the logits our `ladder` plan gives
    on the same weights (gqa at TP=2, mha at TP=1); its plan is recorded (another is
    refused)."""
    from ladder.loaders.base import CheckpointError
    src = tied_llama
    if heads == 6:  # the same model with every KV head its own (mha)
        import transformers
        torch.manual_seed(5)
        src = tmp_path / "mha"
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=128,
            tie_word_embeddings=True)).save_pretrained(src)
    write_dolomite(tmp_path / "dolomite", src, "ladder_residual",
                   "gqa" if heads == 2 else "mha")
    ckpt = open_checkpoint(tmp_path / "dolomite")
    assert ckpt.recorded_plan.spec(3) == "ladder" and ckpt.config.tie_embeddings
    with pytest.raises(CheckpointError, match="ladder"):
        ckpt.plan("standard")
    tp = 2 if heads == 2 else 1  # sliced across ranks (gqa), and whole (mha)
    with LocalTPGroup(GroupOptions(model=str(src), tp=tp, residual="ladder", max_seq=64)) as g:
        want = g.logits(PROMPTS)
    with LocalTPGroup(GroupOptions(model=str(tmp_path / "dolomite"), tp=tp, max_seq=64)) as g:
        got = g.logits(PROMPTS)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("edit, says", [
    ({"normalization_function": None}, "normalization_function='layernorm'"),
    ({"add_bias": True}, "add_bias=True"),
    ({"m_residual": 0.5}, "m_residual"),
    ({"mlp_blocks": [{}]}, "mlp_blocks"),
])
def test_a_dolomite_model_that_is_not_a_llama_is_named(tied_llama, tmp_path, edit, says):
    from ladder.loaders.base import CheckpointError
    write_dolomite(tmp_path / "d", tied_llama, "ladder_residual", "gqa")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg.update(edit)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=says):
        open_checkpoint(tmp_path / "d")


def test_the_papers_llama_ladder_format(tied_llama, tmp_path):
    """ladder-residual-inference's `llamaLadder` config (ladder_layers: the last N layers, or a
    list) runs as our plan over those layers (its forward: tests/test_model.py); a folder
    adapted for the older partial schedule is refused by name."""
    import shutil

    from ladder.loaders.base import CheckpointError
    folder = tmp_path / "ll"
    shutil.copytree(tied_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for layers, spec in ((3, "ladder"), ([0, 1, 2], "ladder"), (2, "ladder:1-2"),
                         ([1, 2], "ladder:1-2")):
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llamaLadder",
                                                        "ladder_layers": layers}))
        assert open_checkpoint(folder).recorded_plan.spec(3) == spec
    old = {**cfg, "ladder_layers": [1, 2], "ladder_adapted": {"parent": "x"}}
    (folder / "config.json").write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="adapt"):
        open_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**old, "ladder_schedule": 2}))
    assert open_checkpoint(folder).recorded_plan.spec(3) == "ladder:1-2"
