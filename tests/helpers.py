"""Helpers shared by the tests (imported as ``helpers``; test files never import each other)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from edgellm.architectures import config_from_hf
from edgellm.decoder import Decoder
from edgellm.tokenizer.core import CHATML

TOL = 1e-5
VOCAB = 256

# The published chat templates, as the recipes must render them.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_CHAT: dict[str, Any] = {**CHATML, "default_system": SMOLLM2_DEFAULT_SYSTEM}
XGEN_INST: dict[str, Any] = {
    "header": ("A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.\n\n"),
    "default_system": None,
    "user": "### Human: {content}\n",
    "assistant": "### Assistant: {content}\n",
    "generation_prompt": "### Assistant:",
}
XVERSE_CHAT: dict[str, Any] = {
    "header": "",
    "default_system": None,
    "user": "Human: {content}\n\n",
    "assistant": "Assistant: {content}</s>",
    "generation_prompt": "Assistant: ",
}


# --------------------------------------------------------------------------- small HF LLaMA models


def hf_dict(**overrides) -> dict:
    """A small HF LLaMA ``config.json`` dict (GQA 4/2, 2 layers, original context 32)."""
    d = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, hidden_act="silu")
    d.update(overrides)
    return d


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights that make every part of the model matter: unit-scale activations,
    sharp attention (q/k gain 2), non-trivial norm weights and biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            v = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            v = 0.2 * torch.randn(p.shape, generator=gen)
        elif "embed_tokens" in name:
            v = 2.0 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=gen)
        else:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            v = gain / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=gen)
        p.copy_(v)
    return model


def hf_model(d: dict, seed: int = 0):
    """transformers' LlamaForCausalLM for config dict ``d`` with ``randomize_`` weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**copy.deepcopy(d))  # LlamaConfig rewrites rope dicts in place
    # transformers' default attention ("sdpa"); its "eager" softmax(QK^T)V differs from any
    # SDPA by float32 rounding alone (up to ~1e-5 at these logit scales)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(cfg), seed).eval()


def ours_from_hf(hf, d: dict, max_seq_len: int, transforms=()) -> Decoder:
    """Our decoder built from the same config dict, weights copied by stripping ``model.``, then
    the given source transforms (``export.transforms.Transform``) applied."""
    from export import transforms as tr

    ours = Decoder(config_from_hf(copy.deepcopy(d), max_seq_len=max_seq_len)).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return tr.apply(ours, list(transforms))


def tokens(n: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf, toks: torch.Tensor) -> torch.Tensor:
    return hf(toks, use_cache=False).logits.float()


@torch.no_grad()
def full(model: Decoder, toks: torch.Tensor) -> torch.Tensor:
    model.reset_cache()
    return model(toks, torch.arange(toks.shape[1]))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def model_from_hf_config(hf: dict, max_seq_len: int | None = None, seed: int = 0):
    """A LoadedModel of an HF-config LLaMA with seeded random weights and the tiny recipe's
    tokenizer and quantization (the one builder of test models that have no recipe)."""
    from edgellm.model import seeded_model
    from edgellm.recipes import load_recipe

    return seeded_model(load_recipe("tiny"), config_from_hf(hf, max_seq_len=max_seq_len), seed)


def rand_weight(rows=64, cols=256, seed=0):
    """A seeded random weight with an outlier column (what makes scale choice matter)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, 3] *= 8
    return w


def scale_exact(t):
    """Exact in fp16 (Core ML, ONNX) and in bf16 (XNNPACK's blockwise scales)."""
    return all(torch.equal(t.to(dt).to(torch.float32), t) for dt in (torch.float16, torch.bfloat16))


def ctrl_c_reaches() -> None:
    """``preexec_fn`` of a child a test interrupts as a terminal's Ctrl-C would: SIGINT at its
    default. A test run started in the background (``cmd &`` in a script, as CI runners may)
    inherits SIGINT ignored, and the child would then finish its work instead of exiting 130."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
