"""ExecuTorch target: the one decoder, lowered to XNNPACK, as a ``.pte`` with its KV cache inside.

One method ``forward(tokens int64[1, T], input_pos int64[T]) -> logits float32[1, T, vocab]``
with a dynamic T (1..``prefill_chunk``) serves prefill and decode; the KV cache is a set of mutable
buffers that persist between calls. Two flavours of the same decoder (``FLAVOURS``):

- ``portable``: only standard ATen ops, formulated so that XNNPACK takes nearly everything
  (RMSNorm mean as a matmul, RoPE rows and the causal mask from float arithmetic, GQA by
  folding query heads instead of copying K/V); the cache write is an ``index_copy`` made
  in-place; attention reads only the filled slots, their count read from the last position
  (``filled_length.py``). Runs in a plain C++ runtime built from the wheel's libraries.
- ``fast``: ExecuTorch's LLM custom ops (``llama::update_cache``, ``llama::custom_sdpa``),
  which attend only to the filled part of the cache; needs the custom-ops library at runtime. An
  fp16/int8 cache is stored by update_cache and read back as fp32 for custom_sdpa
  (``export.transforms.CustomOpKVCache``); int8's arithmetic stays outside XNNPACK
  (``PORTABLE_MODULES``).

Quantized weights come from the codes and scales of the shared quantization (``job.quant``)
as torchao ``IntxUnpackedToInt8Tensor`` -- nothing is re-quantized here. int4 linears are 8da4w
(int8 dynamic per-token activations, 4-bit group-wise weights: XNNPACK qd8-f32-qb4w), int8
linears (and head) 8da8w (the same activations, 8-bit per-row weights: qd8-f32-qc8w); an int4
embedding is ``embedding_4bit``, an int8 one ``embedding_byte`` (per-row scales), both
weight-only gathers of the portable quantized kernels. A tied int8 embedding/head is one set of
codes, read by both.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from edgellm.decoder import Decoder, fill
from edgellm.tokenizer import Tokenizer, runner_json
from export.targets import Flavour
from export.targets.executorch.filled_length import xnnpack_takes_filled_lengths
from export.targets.executorch.lazy_codes import LazyCodes, check_codes, constants_shared_with_preprocess
from export.targets.executorch.lean_edge import lean_edge
from export.targets.executorch.lean_lowering import lean_lowering, partitions_recompiled_once, supported
from export.targets.executorch.memory_plan import cache_planned_once
from export.transforms import Transform

PTE_FILE = "model.pte"
RUNNER_TOKENIZER = "tokenizer.json"  # what ExecuTorch's TextLLMRunner reads (edgellm.tokenizer.runner_json)
_XNNPACK_FORMULATION = (Transform("rmsnorm_as_matmul"), Transform("rope_rows_onehot"), Transform("rope_rotate_linear"))
FLAVOURS = (
    Flavour("portable", "standard ATen ops only, nearly all delegated to XNNPACK; runs in the plain C++ runtime",
            _XNNPACK_FORMULATION + (Transform("mask_arithmetic", {"value": -1e30}), Transform("attention_folded_bmm"),
                                    Transform("mask_filled_from_positions")),
            {"partitioners": ("xnnpack",), "custom_ops": False}, kv_dtypes=("fp32", "fp16", "int8"), kv_window=True),
    Flavour("fast", "ExecuTorch's LLM custom ops (update_cache, custom_sdpa); needs their kernels at runtime",
            _XNNPACK_FORMULATION + (Transform("executorch_llm_ops"),),
            {"partitioners": ("xnnpack",), "custom_ops": True}, kv_dtypes=("fp32", "fp16", "int8"), kv_window=True),
)


def _xnnpack():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    partitioner = XnnpackPartitioner()
    for config in partitioner.target_partitioner_configs.values():
        config.check_constraints = _outside_custom_op_cache(config.check_constraints)
    return partitioner


PORTABLE_MODULES = ("KVQuantize", "KVDequantize")  # export.transforms: the fast flavour's int8 cache arithmetic


def _outside_custom_op_cache(check):
    """``check`` (an XNNPACK op config's), refusing the ops of ``PORTABLE_MODULES`` (the fast
    flavour's int8 cache arithmetic: the key rotation, scale and division that quantize, the
    multiplication that dequantizes), which then run in the portable kernels. Taken, they tie the
    layer's projections on both sides of update_cache into XNNPACK groups that feed each other
    through it (executorch 1.5.1's GroupBasedPartitioner then fails: "Invalid partition, found
    dependency cycles"). No other graph has such an op (the fp32 fast .pte is byte-identical)."""

    def checked(node, ep) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        if any(str(kind).rsplit(".", 1)[-1] in PORTABLE_MODULES for _, kind in stack.values()):
            return False
        return check(node, ep)

    return checked


PARTITIONERS = {"xnnpack": _xnnpack}  # a flavour names its partitioners; a new delegate adds one entry


# ---- the shared quantization as torchao tensor subclasses ----

_TARGET_DTYPE = {4: torch.int4, 8: torch.int8}


def intx_tensor(qw, activations: bool, codes: torch.Tensor | None = None):
    """``QuantizedWeight`` (int4 or int8) -> ``IntxUnpackedToInt8Tensor`` carrying exactly its
    codes and scales: int4 in groups of ``group_size`` along the inputs, int8 one scale per row
    (block (1, cols)). ``codes``: a placeholder for them (``lazy_codes``), whose range is checked
    when resolved."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    if qw.zero_points is not None:
        raise ValueError("XNNPACK's 4-bit kernels are symmetric but this quantization has zero points; "
                         "set quantization.symmetric: true in the recipe")
    if qw.bits == 8 and qw.group_size != qw.shape[1]:
        raise ValueError(f"XNNPACK's 8-bit kernels take one scale per row, got groups of {qw.group_size} in rows "
                         f"of {qw.shape[1]} (quantize with edgellm.quantization, whose int8 is per row)")
    if codes is None:
        codes = check_codes(qw.codes.to(torch.int8), qw)
    scales = qw.scales.to(torch.float32)
    if qw.bits == 4 and not torch.equal(scales.to(torch.bfloat16).to(torch.float32), scales):
        raise ValueError("int4 scales are not exact in bf16, which XNNPACK stores them as: the lowering would "
                         "round them a second time (quantize with edgellm.quantization, whose scales are)")
    act = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if activations else None
    return IntxUnpackedToInt8Tensor(codes, scales, torch.zeros(scales.shape, dtype=torch.int8),
                                    _TARGET_DTYPE[qw.bits], (1, qw.group_size), torch.float32, act)


def scheme_of(module: nn.Module, qw) -> str:
    """What XNNPACK / the portable kernels run for one quantized weight: ``8da4w`` / ``8da8w``
    linears (int8 dynamic per-token activations; qd8-f32-qb4w / qd8-f32-qc8w), ``embedding_4bit``
    / ``embedding_byte`` gathers."""
    if isinstance(module, nn.Linear):
        return f"8da{qw.bits}w"
    return "embedding_4bit" if qw.bits == 4 else "embedding_byte"


def quantized_tensor(module: nn.Module, name: str, qw, lazy: LazyCodes | None = None) -> torch.Tensor:
    """The int4/int8 tensor XNNPACK takes for ``module``'s weight: 8da4w / 8da8w for a Linear
    (its codes a placeholder when ``lazy``: XNNPACK packs every linear), weight-only for an
    Embedding (the gather dequantizes; to_executorch makes it embedding_4bit / embedding_byte
    from the real codes)."""
    if isinstance(module, nn.Linear):
        if module.in_features % qw.group_size:
            raise ValueError(f"{name}: in_features {module.in_features} is not a multiple of the group size "
                             f"{qw.group_size}; XNNPACK's 4-bit linear needs whole groups")
        return intx_tensor(qw, activations=True, codes=lazy.placeholder(name, qw) if lazy is not None else None)
    if isinstance(module, nn.Embedding):
        return intx_tensor(qw, activations=False)
    raise TypeError(f"quantized weight {name!r} belongs to a {type(module).__name__}, not a Linear/Embedding")


int4_weight = quantized_tensor  # the name it had while every quantized weight was int4


def weighted_decoder(job, lazy: LazyCodes | None = None) -> tuple[Decoder, dict[str, str]]:
    """The flavour's decoder, built on the meta device and then given its tensors one at a time:
    the shared int4/int8 codes as torchao tensors for the quantized weights (placeholders for
    the linears' codes with ``lazy``), the checkpoint's fp32 for the rest (norms), the buffers
    from ``job.tensor_source()`` -- the fp32 model never exists.
    Returns the decoder and, per quantized weight carried, its scheme (``scheme_of``)."""
    model = job.decoder(meta=True)
    source = job.tensor_source()
    quant = job.quant.weights if job.quant is not None else {}
    unknown = sorted(set(quant) - {n for n, _ in model.named_parameters(remove_duplicate=False)})
    if unknown:
        raise KeyError(f"quantized weights {unknown[:3]} do not exist in the decoder")
    done: dict[str, str] = {}

    def parameter(name, mod, _meta):
        if name in quant:
            done[name] = scheme_of(mod, quant[name])
            return nn.Parameter(quantized_tensor(mod, name, quant[name], lazy), requires_grad=False)
        return nn.Parameter(source(name))  # a default Parameter, as a module built with weights has (the .pte records the flag)

    fill(model, parameter, source)
    return model, done


# ---- export ----

PREFILL_CHUNK = 128  # most tokens one forward takes (as ExecuTorch's export_llama)


def prefill_chunk(cfg) -> int:
    """The program's largest T. ExecuTorch plans every activation at its upper bound and the
    runtime allocates (and zero-fills) that plan when it loads the method, so a T of capacity - 1
    held the logits and MLP activations of a whole-cache prefill resident for the program's life
    (at XGen-7B's 8191 tokens, 51200-wide logits alone are 1.7 GB). Longer prompts are prefilled
    in chunks of this size, by every runner (``dynamic_tokens`` in the manifest,
    ``get_max_seq_len`` for TextLLMRunner)."""
    return min(cfg.max_chunk, PREFILL_CHUNK)


def constant_methods(job) -> dict:
    """Metadata ExecuTorch's LLM runner (TextLLMRunner) reads from the program: it prefills in
    chunks of ``get_max_seq_len`` tokens into a cache of ``get_max_context_len`` slots."""
    cfg, rec = job.loaded.config, job.loaded.recipe
    return {
        "get_max_seq_len": prefill_chunk(cfg),
        "get_max_context_len": cfg.max_seq_len,
        "get_vocab_size": cfg.vocab_size,
        "get_n_layers": cfg.n_layers,
        "get_bos_id": rec.bos_id if rec.bos_id is not None else -1,
        "get_eos_ids": list(rec.eos_ids),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": bool(job.flavour.options["custom_ops"]),
        "enable_dynamic_shape": True,
    }


def export_program(model: Decoder, max_seq_len: int | None = None):
    """torch.export with a dynamic query length 1..``prefill_chunk`` (``max_seq_len``: 1..that - 1)."""
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2, dtype=torch.long))
    T = torch.export.Dim("T", min=1, max=prefill_chunk(model.config) if max_seq_len is None else max_seq_len - 1)
    with torch.no_grad():
        return torch.export.export(model, example, dynamic_shapes=({1: T}, {0: T}), strict=False)


def lower_program(ep, constants: dict, partitioners=("xnnpack",), lazy: LazyCodes | None = None,
                  status=lambda message: None):
    """Partitioning (XNNPACK by default) -> ExecuTorch program (cache write made in-place).
    ``lazy``: the program's placeholder codes, resolved as XNNPACK packs them; ``status`` names
    the sub-stage that runs (a live display). XNNPACK takes attention over the filled slots
    (``filled_length.py``)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.dialects._ops import ops

    status("executorch: lower: edge dialect and XNNPACK partitioning")
    if lazy is not None:
        lazy.on_packed = lambda n, total: status(f"executorch: lower: XNNPACK packed {n}/{total} quantized weights")
    with lean_edge(), lean_lowering() as lean, partitions_recompiled_once(), xnnpack_takes_filled_lengths(), \
            (constants_shared_with_preprocess() if lean else contextlib.nullcontext()), \
            (lazy.reading() if lazy is not None else contextlib.nullcontext()):
        # the same program, without retraces that cannot change it (lean_edge.py, lean_lowering.py)
        # or recompiles nothing runs (partitions_recompiled_once)
        edge = to_edge_transform_and_lower(ep, partitioner=[PARTITIONERS[p]() for p in partitioners],
                                           constant_methods=constants,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
    del ep  # the delegates hold what they took; the int8 codes they consumed can go (when the caller let go too)
    if lazy is not None:
        lazy.check()
    status("executorch: lower: memory planning and serialization prep")
    et = edge.to_executorch(ExecutorchBackendConfig(
        passes=[], do_quant_fusion_and_const_prop=True,  # torchao dequantize_affine+embedding -> embedding_4bit
        run_reinplace_pass=True, reinplace_extra_ops=frozenset({ops.edge.aten.index_copy.default}),
        memory_planning_pass=cache_planned_once(alloc_graph_input=True, alloc_graph_output=True)))
    return et, delegation_census(et.exported_program())


def delegation_census(ep) -> dict:
    """Ops left outside the XNNPACK delegates (name -> count) and the number of delegate calls."""
    outside, delegates = Counter(), 0
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name:
            delegates += 1
        elif name not in ("getitem",) and not name.startswith("sym_") and "_assert" not in name:
            outside[name] += 1
    return {"delegates": delegates, "outside": dict(sorted(outside.items()))}


def schemes_record(schemes: dict[str, str]) -> dict:
    """The manifest's account of the quantized weights (``weighted_decoder``'s schemes): the
    decoder layers' linears (``8da4w``, ``8da8w``, ``8da4w+8da8w`` when mixed, ``fp32``), the
    head and the embedding, and the dynamic activation arithmetic in front of every quantized
    linear (XNNPACK qd8: int8 per token, asymmetric)."""
    ends = ("embed_tokens.weight", "lm_head.weight")
    linears = sorted({s for n, s in schemes.items() if n not in ends})
    return {"linear_scheme": "+".join(linears) or "fp32",
            "head_scheme": schemes.get("lm_head.weight", "fp32"),
            "embedding_scheme": schemes.get("embed_tokens.weight", "fp32"),
            "activation_scheme": "int8-token-asym" if any(s.startswith("8da") for s in schemes.values()) else None}


def exported_program(job, lazy: LazyCodes | None = None):
    """The program handed to lowering: (ExportedProgram, transforms applied, quantized weights:
    name -> scheme). The decoder itself is not returned: the program holds its tensors."""
    model, quantized = weighted_decoder(job, lazy)
    if quantized:
        counts = Counter(quantized.values())
        job.progress(f"executorch: {len(quantized)} quantized weights ("
                     + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
    return export_program(model), list(model.transforms), quantized


def lower(job) -> Path:
    cfg, flavour = job.loaded.config, job.flavour
    # The linears' codes exist only while XNNPACK packs them (lazy_codes.py; the patched read
    # is executorch 1.5.1's), and the run's last consumer of the quantization frees each shared
    # weight once packed -- after its manifest summary, which reads them all.
    lazy = LazyCodes(release=job.last_use) if job.quant is not None and supported() else None
    if lazy is not None and lazy.release:
        job.quant.summary()
    with job.stage("trace"):
        traced = list(exported_program(job, lazy))
        applied, quantized = traced[1:]
    with job.stage("lower"):  # the program's only reference moves into lower_program, which drops it
        et, census = lower_program(traced.pop(0), constant_methods(job), flavour.options["partitioners"], lazy,
                                   status=getattr(job.progress, "status", lambda message: None))
    outside = ", ".join(f"{k} x{v}" for k, v in census["outside"].items()) or "none"
    job.progress(f"executorch: {census['delegates']} delegate calls; ops outside delegates: {outside}")
    with job.writer() as w:
        with job.stage("write"):
            with open(w.path(PTE_FILE), "wb") as f:  # streamed from its pieces: et.buffer is a second copy
                et.write_to_file(f)
            del et
            job.write_tokenizer(w)
            runner_json.write(Tokenizer.load(w.dir), w.dir)  # as read back, for ExecuTorch's TextLLMRunner
        manifest = job.manifest(PTE_FILE, applied, executorch={
            "flavour": flavour.name, "method": "forward", "dynamic_tokens": [1, prefill_chunk(cfg)],
            "custom_ops": bool(flavour.options["custom_ops"]), "partitioners": list(flavour.options["partitioners"]),
            "quantized_weights": len(quantized), **schemes_record(quantized),
            "delegation": census, "runner_tokenizer": RUNNER_TOKENIZER})
        return w.commit(manifest)
