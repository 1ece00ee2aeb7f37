"""Checkpoint loaders: HF folders in every layout, XVERSE configs, GGUF (a tiny one written
here and the real SmolLM2 Q4_1 file), llama.cpp's rotary permutation, and clear errors."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from export import load_decoder
from edgellm.architectures.llama import unpermute_rotary
from edgellm.weights import CheckpointError, load_gguf, load_hf_folder
from helpers import TOL, full, hf_dict, hf_logits, hf_model, maxdiff, tokens

# --------------------------------------------------------------------------- HF folders


def _save_bin_shards(hf, folder, n_shards: int = 3):
    """pytorch_model-0000i-of-0000n.bin shards plus pytorch_model.bin.index.json, as
    transformers 4 wrote them (transformers 5's save_pretrained only writes safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    names = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k] for k in names[i::n_shards]}
        torch.save(part, folder / shard)
        weight_map.update({k: shard for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


LAYOUTS = ["safetensors", "safetensors-sharded", "bin-single", "bin-sharded"]


def _write(hf, folder, layout):
    if layout == "safetensors":
        hf.save_pretrained(folder)
        assert (folder / "model.safetensors").exists()
    elif layout == "safetensors-sharded":
        hf.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    elif layout == "bin-single":
        folder.mkdir()
        hf.config.save_pretrained(folder)
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    else:
        _save_bin_shards(hf, folder)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", [{}, {"tie_word_embeddings": True, "attention_bias": True, "num_key_value_heads": 1}],
                         ids=["gqa-untied", "mqa-tied-bias"])
def test_hf_folder_layouts(tmp_path, layout, arch):
    from transformers import AutoModelForCausalLM

    d = hf_dict(max_position_embeddings=64, **arch)
    hf = hf_model(d, seed=11)
    folder = tmp_path / layout
    _write(hf, folder, layout)
    toks = tokens(48)
    ref = hf_logits(hf, toks)
    ours = load_decoder(checkpoint=folder)
    assert ours.config.max_seq_len == 64  # the checkpoint's context when not given
    assert ours.config.tie_embeddings == bool(arch.get("tie_word_embeddings"))
    assert maxdiff(full(ours, toks), ref) <= TOL
    # transformers reading the same folder agrees (the folder really is what it claims)
    if layout.startswith("safetensors"):
        again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert maxdiff(hf_logits(again, toks), ref) <= TOL
    # no recipe: one is synthesized from the folder itself
    rec = ours.recipe
    assert rec.architecture is None and rec.tokenizer == {"source": "hf", "path": str(folder)}
    assert rec.bos_id == hf.config.bos_token_id and rec.eos_ids == [hf.config.eos_token_id]


def test_max_seq_len_override(tmp_path):
    d = hf_dict()
    hf = hf_model(d)
    hf.save_pretrained(tmp_path)
    cfg, state = load_hf_folder(tmp_path, max_seq_len=100)
    assert cfg.max_seq_len == 100
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not any(k.startswith("model.") for k in state)


def test_llama_config_defaults_match_transformers(tmp_path):
    """A hand-written llama config.json without rms_norm_eps / num_key_value_heads / rope_theta:
    the defaults are transformers' (eps 1e-6, multi-head, theta 10000)."""
    from transformers import AutoModelForCausalLM

    hf = hf_model(hf_dict(num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=64), seed=8)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("rms_norm_eps", "num_key_value_heads", "rope_parameters", "rope_theta", "rope_scaling"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_decoder(checkpoint=tmp_path)
    assert ours.config.norm_eps == theirs.config.rms_norm_eps == 1e-6
    assert ours.config.n_kv_heads == 4 and ours.config.rope.theta == 10000.0
    toks = tokens(40)
    assert maxdiff(full(ours, toks), hf_logits(theirs, toks)) <= TOL


def _xverse_config(**over) -> dict:
    """An XVERSE-7B-style config.json: model_type xverse, no num_key_value_heads and no
    rms_norm_eps (its config class defaults them: multi-head, eps 1e-6)."""
    c = {"architectures": ["XverseForCausalLM"],
         "auto_map": {"AutoConfig": "configuration_xverse.XverseConfig",
                      "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"},
         "model_type": "xverse", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "silu",
         "max_position_embeddings": 64, "max_tokenizer_truncation": 48, "initializer_range": 0.02,
         "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "use_cache": True}
    c.update(over)
    return c


@pytest.mark.parametrize("weights", ["safetensors", "bin-sharded"])
def test_xverse_folder(tmp_path, weights):
    from safetensors.torch import save_file

    # XVERSE's tensors use the LLaMA names; a LLaMA model with eps 1e-6 and 4 KV heads is the reference
    hf = hf_model(hf_dict(num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=64), seed=5)
    (tmp_path / "config.json").write_text(json.dumps(_xverse_config()))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if weights == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        shutil.copy(tmp_path / "config.json", tmp_path / "xverse.json")
        _save_bin_shards(hf, tmp_path, n_shards=2)
        shutil.move(tmp_path / "xverse.json", tmp_path / "config.json")  # keep the xverse config
    ours = load_decoder(checkpoint=tmp_path)
    cfg = ours.config
    assert cfg.n_kv_heads == cfg.n_heads == 4 and cfg.head_dim == 16
    assert cfg.norm_eps == 1e-6
    assert cfg.max_seq_len == 64 and not cfg.tie_embeddings
    assert ours.recipe.bos_id == 2 and ours.recipe.eos_ids == [3]
    toks = tokens(40)
    assert maxdiff(full(ours, toks), hf_logits(hf, toks)) <= TOL
    # an explicit eps in an xverse config wins
    (tmp_path / "config.json").write_text(json.dumps(_xverse_config(rms_norm_eps=1e-5)))
    assert load_hf_folder(tmp_path)[0].norm_eps == 1e-5


# --------------------------------------------------------------------------- llama.cpp permutation


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py, LlamaModel.permute (n_head = the KV head count for K):
    weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_half(x, pos, theta=10000.0):
    """HF rotate-half RoPE on [T, H, D]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).double() / d)
    ang = pos[:, None].double() * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rope_interleaved(x, pos, theta=10000.0):
    """GGML's normal-mode RoPE: rotates adjacent pairs (x[2i], x[2i+1])."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).double() / d)
    ang = pos[:, None].double() * inv
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


@pytest.mark.parametrize("n_heads,head_dim,cols", [(4, 16, 64), (1, 8, 16), (3, 64, 5), (2, 4, 0)])
def test_unpermute_rotary_inverts_llama_cpp(n_heads, head_dim, cols):
    g = torch.Generator().manual_seed(0)
    shape = (n_heads * head_dim, cols) if cols else (n_heads * head_dim,)  # cols=0: a bias vector
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    p = llama_cpp_permute(w, n_heads)
    if head_dim > 2:
        assert not torch.equal(p, w)
    assert torch.equal(unpermute_rotary(p, n_heads), w)
    assert torch.equal(llama_cpp_permute(unpermute_rotary(w, n_heads), n_heads), w)


def test_permutation_maps_rotate_half_to_interleaved_rope():
    """Why the permutation exists: GGML's interleaved RoPE on permuted Q/K rows gives the
    attention scores of HF's rotate-half RoPE on the original rows."""
    g = torch.Generator().manual_seed(1)
    hq, hkv, dh, dim, T = 4, 2, 16, 32, 9
    wq = torch.randn(hq * dh, dim, generator=g, dtype=torch.float64)
    wk = torch.randn(hkv * dh, dim, generator=g, dtype=torch.float64)
    x = torch.randn(T, dim, generator=g, dtype=torch.float64)
    pos = torch.arange(T)

    def scores(q, k):
        k = k.repeat_interleave(hq // hkv, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    hf = scores(_rope_half((x @ wq.T).view(T, hq, dh), pos), _rope_half((x @ wk.T).view(T, hkv, dh), pos))
    pq, pk = llama_cpp_permute(wq, hq), llama_cpp_permute(wk, hkv)
    cpp = scores(_rope_interleaved((x @ pq.T).view(T, hq, dh), pos),
                 _rope_interleaved((x @ pk.T).view(T, hkv, dh), pos))
    assert torch.allclose(hf, cpp, atol=1e-9)
    uq, uk = unpermute_rotary(pq, hq), unpermute_rotary(pk, hkv)
    back = scores(_rope_half((x @ uq.T).view(T, hq, dh), pos), _rope_half((x @ uk.T).view(T, hkv, dh), pos))
    assert torch.allclose(hf, back, atol=1e-9)


# --------------------------------------------------------------------------- a GGUF written here

_GGUF_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(hf, path, rope_scaling: tuple[str, float] | None = None):
    """An F32 llama GGUF of ``hf`` written the way llama.cpp's converter does (Q/K rows
    permuted for GGML's interleaved RoPE, tied output omitted)."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    for name, t in hf.state_dict().items():
        name = name.removeprefix("model.")
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("layers."):
            _, i, *rest = name.split(".")
            mod, kind = ".".join(rest[:-1]), rest[-1]
            out = f"blk.{i}.{_GGUF_LAYER[mod]}.{kind}"
            if mod == "self_attn.q_proj":
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                t = llama_cpp_permute(t, c.num_key_value_heads)
        else:
            out = _GGUF_NAMES[name]
        w.add_tensor(out, t.detach().float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,scaling", [
    ({}, None),
    ({"tie_word_embeddings": True, "attention_bias": True, "num_key_value_heads": 1}, None),
    ({"rope_scaling": {"type": "linear", "factor": 4.0}, "head_dim": 24}, ("linear", 4.0)),
], ids=["gqa", "mqa-tied-bias", "linear-head_dim"])
def test_written_gguf_matches_transformers(tmp_path, arch, scaling):
    d = hf_dict(max_position_embeddings=64, rms_norm_eps=1e-6, **arch)
    hf = hf_model(d, seed=21)
    path = write_llama_gguf(hf, tmp_path / "tiny.gguf", scaling)
    ours = load_decoder(checkpoint=path)
    cfg = ours.config
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (4, d["num_key_value_heads"], d.get("head_dim", 16))
    assert cfg.tie_embeddings == bool(arch.get("tie_word_embeddings"))
    assert cfg.attention_bias == bool(arch.get("attention_bias"))
    assert cfg.rope.type == (scaling[0] if scaling else "default")
    assert cfg.max_seq_len == 64 and cfg.norm_eps == pytest.approx(1e-6)
    assert ours.recipe.tokenizer == {"source": "gguf", "path": str(path)}
    toks = tokens(48)
    assert maxdiff(full(ours, toks), hf_logits(hf, toks)) <= TOL


# --------------------------------------------------------------------------- SmolLM2 from its real GGUF

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
N_GREEDY = 32


def _transformers_from_gguf(p):
    """transformers' own GGUF loading (dequantize + un-permute). ``from_pretrained`` with
    ``gguf_file`` insists on the ``accelerate`` package although it needs nothing from it on
    CPU; without it, the same loader (``load_gguf_checkpoint``) is called directly."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(p), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


@pytest.fixture(scope="module")
def smollm2_gguf():
    from transformers import AutoTokenizer

    from edgellm.assets import fetch

    p = fetch("smollm2-135m-instruct.gguf")
    ours = load_decoder(checkpoint=p, max_seq_len=128)
    hf = _transformers_from_gguf(p)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    return p, ours, hf, ids


def test_smollm2_gguf_config(smollm2_gguf):
    p, ours, hf, ids = smollm2_gguf
    c, h = ours.config, hf.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim) == \
           (h.vocab_size, h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads,
            h.head_dim, h.intermediate_size) == (49152, 576, 30, 9, 3, 64, 1536)
    assert c.tie_embeddings and h.tie_word_embeddings
    assert c.rope.theta == h.rope_parameters["rope_theta"] == 100000.0 and c.rope.type == "default"
    assert c.norm_eps == h.rms_norm_eps
    assert c.max_seq_len == 128
    assert ours.recipe.bos_id == 1 and ours.recipe.eos_ids == [2]


def test_smollm2_gguf_logits_match_transformers(smollm2_gguf):
    p, ours, hf, ids = smollm2_gguf
    ref = hf_logits(hf, ids)
    got = full(ours, ids)
    assert got.abs().max() > 10  # trained weights: real, peaked logits
    assert maxdiff(got, ref) <= 1e-4, maxdiff(got, ref)


@torch.no_grad()
def test_smollm2_gguf_greedy_tokens_match_transformers(smollm2_gguf):
    p, ours, hf, ids = smollm2_gguf
    n = ids.shape[1]
    # ours: prefill, then one token at a time through the static cache
    ours.reset_cache()
    logits = ours(ids, torch.arange(n))
    mine = []
    for i in range(N_GREEDY):
        nxt = int(logits[0, -1].argmax())
        mine.append(nxt)
        logits = ours(torch.tensor([[nxt]]), torch.tensor([n + i]))
    # transformers: its own KV cache
    out = hf(ids, use_cache=True)
    past, theirs = out.past_key_values, []
    for _ in range(N_GREEDY):
        nxt = int(out.logits[0, -1].argmax())
        theirs.append(nxt)
        out = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    assert mine == theirs
    assert len(set(mine)) > 3  # a real continuation, not one token repeated


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    hf_model(hf_dict(), seed=2).save_pretrained(folder, max_shard_size="40KB")
    return folder


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; pass an HF model folder or a .gguf file"):
        load_decoder(checkpoint=tmp_path / "nothing-here")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


def test_folder_without_config(tmp_path, good_folder):
    f = _copy(good_folder, tmp_path / "f")
    (f / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_decoder(checkpoint=f)


def test_folder_without_weights(tmp_path, good_folder):
    f = tmp_path / "f"
    f.mkdir()
    shutil.copy(good_folder / "config.json", f)
    with pytest.raises(CheckpointError, match="no weights in"):
        load_decoder(checkpoint=f)


def test_index_names_missing_shard(tmp_path, good_folder):
    f = _copy(good_folder, tmp_path / "f")
    shard = sorted(f.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name} which is missing"):
        load_decoder(checkpoint=f)


def test_corrupt_index(tmp_path, good_folder):
    f = _copy(good_folder, tmp_path / "f")
    (f / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a valid shard index"):
        load_decoder(checkpoint=f)


def test_corrupt_safetensors(tmp_path, good_folder):
    f = _copy(good_folder, tmp_path / "f")
    shard = sorted(f.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match=shard.name):
        load_decoder(checkpoint=f)


def test_corrupt_bin(tmp_path):
    hf = hf_model(hf_dict())
    f = tmp_path / "f"
    _write(hf, f, "bin-single")
    (f / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_decoder(checkpoint=f)


def test_corrupt_config(tmp_path, good_folder):
    f = _copy(good_folder, tmp_path / "f")
    (f / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_decoder(checkpoint=f)
    cfg = json.loads((good_folder / "config.json").read_text())
    del cfg["hidden_size"]
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_decoder(checkpoint=f)
    cfg = json.loads((good_folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_decoder(checkpoint=f)


def test_missing_tensor(tmp_path, good_folder):
    from safetensors.torch import load_file, save_file

    f = _copy(good_folder, tmp_path / "f")
    shard = sorted(f.glob("model-*.safetensors"))[-1]
    part = load_file(str(shard))
    victim = sorted(part)[0]
    del part[victim]
    save_file(part, str(shard))
    with pytest.raises(CheckpointError, match="does not match the architecture: missing"):
        load_decoder(checkpoint=f)


def test_config_disagrees_with_weights(tmp_path, good_folder):
    f = _copy(good_folder, tmp_path / "f")
    cfg = json.loads((f / "config.json").read_text())
    cfg["intermediate_size"] = 128  # weights are 96 wide
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp"):
        load_decoder(checkpoint=f)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_decoder(checkpoint=bad)
    good = write_llama_gguf(hf_model(hf_dict()), tmp_path / "good.gguf")
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        load_decoder(checkpoint=cut)


def test_gguf_other_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        load_decoder(checkpoint=tmp_path / "gpt2.gguf")


def test_n_layers_truncation(tmp_path):
    """``n_layers`` keeps the first layers of a real checkpoint (used for big recipes)."""
    d = hf_dict(num_hidden_layers=3)
    hf = hf_model(d)
    hf.save_pretrained(tmp_path)
    ours = load_decoder(checkpoint=tmp_path, n_layers=1)
    assert ours.config.n_layers == 1 and len(ours.layers) == 1
    two = copy.deepcopy(d)
    two["num_hidden_layers"] = 1
    ref = hf_model(two)
    ref.load_state_dict({k: v for k, v in hf.state_dict().items()
                         if not k.startswith("model.layers.") or k.split(".")[2] == "0"})
    toks = tokens(20)
    assert maxdiff(full(ours, toks), hf_logits(ref, toks)) <= TOL
