"""Export a trained run: GGUF (llama.cpp), safetensors (weights only) or a Hugging Face folder.

The GPT maps onto the Llama family exactly: RMSNorm (eps inside the square
root), RoPE on every head dimension, no biases, attention scaled by
``1/sqrt(head_dim)``. Its FFN picks the architecture:

* ``swiglu`` -> ``llama`` (GGUF) / ``LlamaForCausalLM`` (HF), ``down(silu(gate x) * up x)``;
* ``relu2`` -> ``arcee`` (GGUF) / ``ArceeForCausalLM`` (HF), ``down(relu(up x)^2)``:
  Arcee is Llama with an ungated squared-ReLU FFN, in llama.cpp and transformers alike.

RoPE convention. :func:`sparsetrain.model.apply_rope` rotates the pairs
``(x[i], x[i + hd/2])`` (first half, second half; "NeoX style") by the angle
``pos * theta^(-2i/hd)``. Hugging Face's Llama ``rotate_half`` is the same
convention, so HF weights are ours unchanged. llama.cpp's ``llama`` and
``arcee`` graphs rotate adjacent pairs ``(x[2i], x[2i+1])`` by that same angle,
so the GGUF stores the q and k rows of every head interleaved
(:func:`interleave_rope_rows`): row ``2i`` is our row ``i``, row ``2i+1`` our
row ``i + hd/2``. Attention scores are dot products over the head dimension,
unchanged when q and k are permuted alike; v and the output projection keep
their order.

Tied embeddings store one matrix: GGUF leaves out ``output.weight`` (llama.cpp
then reads ``token_embd.weight``), HF sets ``tie_word_embeddings``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .checkpoint import refuse_overwriting_a_run
from .errors import ConfigError, SparsetrainError
from .generate import load_model, run_directory
from .build import build_model
from .model import GPT, CausalLM
from .tokenizer import EOT

FORMATS = ("gguf", "safetensors", "hf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CONFIG_METADATA_KEY = "sparsetrain.model_config"
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class LlamaFamily:
    """Where a GPT lands: the GGUF architecture, the HF class and its activation name."""

    gguf_arch: str
    hf_architecture: str
    hf_model_type: str
    hf_hidden_act: str


LLAMA = LlamaFamily("llama", "LlamaForCausalLM", "llama", "silu")
ARCEE = LlamaFamily("arcee", "ArceeForCausalLM", "arcee", "relu2")


@dataclass(frozen=True)
class BPEVocab:
    """A byte-level BPE vocabulary as GGUF stores it: token strings by id (in the
    byte-level alphabet), merges as ``"left right"`` in rank order, the special ids;
    ids from ``n_tokenizer`` on are padding up to the model's vocabulary size."""

    tokens: list[str]
    merges: list[str]
    special_ids: frozenset[int]
    n_tokenizer: int


# ----------------------------------------------------------------------------- shared pieces


def llama_family(model: CausalLM) -> LlamaFamily:
    """The Llama-family architecture ``model`` maps onto exactly, or
    :class:`ConfigError` naming what has no equivalent."""
    cfg = model.config
    if cfg.arch != "gpt":
        raise ConfigError(f"model.arch = {cfg.arch} has no GGUF or Hugging Face architecture; export --format safetensors")
    if cfg.hyper_connections:
        raise ConfigError("model.hyper_connections has no GGUF or Hugging Face architecture; export --format safetensors")
    if cfg.ffn == "swiglu":
        return LLAMA
    if cfg.ffn == "relu2":
        return ARCEE
    # relu2_24: dense squared ReLU during its warmup, then a 2:4 mask on the activations
    if any(getattr(block.ffn, "sparse", False) for block in model.blocks):
        raise ConfigError("model.ffn = relu2_24 past its dense warmup prunes FFN activations 2:4, which neither "
                          "llama.cpp nor transformers computes; export --format safetensors")
    return ARCEE


def split_qkv(weight: torch.Tensor, d_model: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused ``qkv`` weight ``[3d, d]`` as q, k, v ``[d, d]`` (the attention
    reads its output as ``[3, n_head, head_dim]``)."""
    return weight[:d_model], weight[d_model : 2 * d_model], weight[2 * d_model :]


def interleave_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's output rows from (first half, second half) pairs to
    adjacent pairs: new row ``2i`` = row ``i``, new row ``2i+1`` = row ``i + hd/2``."""
    rows, cols = weight.shape
    hd = rows // n_head
    return weight.reshape(n_head, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def read_bpe_vocab(tokenizer_json: str | Path, vocab_size: int) -> BPEVocab:
    """Tokens, merges and special ids of a ``tokenizers`` byte-level BPE file,
    the token list padded to the model's ``vocab_size`` with ``[PADi]`` entries."""
    try:
        spec = json.loads(Path(tokenizer_json).read_text())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise SparsetrainError(f"{tokenizer_json} is a {model.get('type')} tokenizer, not byte-level BPE")
        vocab = dict(model["vocab"])
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SparsetrainError(f"cannot read tokenizer {tokenizer_json}: {type(e).__name__}: {e}") from None
    vocab.update(special)
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise SparsetrainError(f"tokenizer {tokenizer_json} has {n} tokens, more than model.vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for text, i in vocab.items():
        tokens[i] = text
    # tokenizers writes merges as ["a", "b"] pairs (0.20 on) or "a b" strings (before)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return BPEVocab(tokens, merges, frozenset(special.values()), n)


def check_gpt2_pre_tokenizer(tokenizer_json: str | Path) -> None:
    """Refuse a tokenizer whose text splitting is not what a GGUF's ``gpt-2``
    pre-tokenizer declares (``tokenizers``' ByteLevel with GPT-2's regex, no
    prefix space, no normalizer): llama.cpp would cut prompts into other tokens
    than the run trained on. Our own BPE is of that kind; a user's may not be."""
    spec = json.loads(Path(tokenizer_json).read_text())
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if (pre.get("type") != "ByteLevel" or pre.get("add_prefix_space", True) or not pre.get("use_regex", True)
            or norm is not None):
        what = f"normalizer {norm.get('type')}" if isinstance(norm, dict) else f"pre-tokenizer {pre.get('type')}"
        raise SparsetrainError(f"tokenizer {tokenizer_json} splits text unlike GGUF's gpt-2 pre-tokenizer "
                               f"(its {what}, {json.dumps(pre, sort_keys=True)[:120]}): llama.cpp would tokenize "
                               f"prompts otherwise; export safetensors or hf instead")


def _cpu_state(model: CausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict on the CPU, floating-point tensors cast to ``dtype``, others as they are."""
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in model.state_dict().items()}


def _import(module: str):
    """``module``, or a one-line :class:`SparsetrainError` saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SparsetrainError(f"exporting needs the {module} package: pip install 'sparsetrain[export]'") from None


def _check_output(out: Path, want_dir: bool, force: bool) -> None:
    refuse_overwriting_a_run(out)  # even with --force: the run is what the export is made from
    if want_dir and out.exists() and not out.is_dir():
        raise SparsetrainError(f"--out {out} is a file; the hf format writes a folder")
    if not want_dir and out.is_dir():
        raise SparsetrainError(f"--out {out} is a folder; give a file path")
    if out.exists() and not force and (not want_dir or any((out / f).exists() for f in HF_FILES)):
        raise SparsetrainError(f"{out} already exists; pass --force to overwrite it")


def _atomic_path(out: Path):
    """A temporary name next to ``out`` (renamed over it once complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    return Path(tmp)


# ----------------------------------------------------------------------------- safetensors


def export_safetensors(model: CausalLM, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The state dict (any architecture; floating-point tensors in ``dtype``) in one
    ``.safetensors`` file, the model config as JSON in its metadata under
    ``sparsetrain.model_config``. A tied LM head is stored once (as ``embed.weight``)."""
    save_file = _import("safetensors.torch").save_file

    out = Path(out)
    state = _cpu_state(model, dtype)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    state = {k: v.contiguous() for k, v in state.items()}
    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(asdict(model.config), sort_keys=True)}
    tmp = _atomic_path(out)
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> CausalLM:
    """Rebuild the model a :func:`export_safetensors` file holds (weights in its stored dtype)."""
    safe_open = _import("safetensors").safe_open
    load_file = _import("safetensors.torch").load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except Exception as e:  # OSError, or safetensors' own SafetensorError
        raise SparsetrainError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if CONFIG_METADATA_KEY not in meta:
        raise SparsetrainError(f"{path} has no {CONFIG_METADATA_KEY} metadata: not a sparsetrain export")
    cfg = ModelConfig(**json.loads(meta[CONFIG_METADATA_KEY]))
    model = build_model(cfg).to(device=device, dtype=state["embed.weight"].dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------- GGUF


def gguf_tensors(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The GGUF tensors of a Llama-family GPT by llama.cpp name, q and k rows
    interleaved for llama.cpp's adjacent-pair RoPE. Norm gains stay float32."""
    gguf = _import("gguf")

    cfg = model.config
    llama_family(model)
    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    state = _cpu_state(model, torch.float32)
    out = {names[T.TOKEN_EMBD] + ".weight": state["embed.weight"],
           names[T.OUTPUT_NORM] + ".weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out[names[T.OUTPUT] + ".weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        q, k, v = split_qkv(state[p + "attn.qkv.weight"], cfg.d_model)
        layer = {
            T.ATTN_NORM: state[p + "attn_norm.weight"],
            T.ATTN_Q: interleave_rope_rows(q, cfg.n_head),
            T.ATTN_K: interleave_rope_rows(k, cfg.n_head),
            T.ATTN_V: v,
            T.ATTN_OUT: state[p + "attn.proj.weight"],
            T.FFN_NORM: state[p + "ffn_norm.weight"],
            T.FFN_UP: state[p + "ffn.up.weight"],
            T.FFN_DOWN: state[p + "ffn.down.weight"],
        }
        if cfg.ffn == "swiglu":
            layer[T.FFN_GATE] = state[p + "ffn.gate.weight"]
        for kind, w in layer.items():
            out[names[kind].format(bid=i) + ".weight"] = w
    # llama.cpp reads 1-D tensors (the norm gains) as float32 only
    return {k: (w.to(dtype) if w.dim() > 1 else w) for k, w in out.items()}


def export_gguf(model: GPT, tokenizer_json: str | Path, out: str | Path, dtype: torch.dtype = torch.float32,
                name: str = "sparsetrain") -> Path:
    """Write a GGUF file llama.cpp loads as ``llama`` (SwiGLU) or ``arcee`` (relu2):
    hyperparameters, the byte-level BPE vocabulary (``gpt2`` model, ``gpt-2``
    pre-tokenizer, end-of-text as BOS and EOS) and the tensors of :func:`gguf_tensors`."""
    gguf = _import("gguf")

    cfg = model.config
    family = llama_family(model)
    vocab = read_bpe_vocab(tokenizer_json, cfg.vocab_size)
    check_gpt2_pre_tokenizer(tokenizer_json)
    if EOT not in vocab.tokens:
        raise SparsetrainError(f"tokenizer {tokenizer_json} has no {EOT} token")
    eot = vocab.tokens.index(EOT)
    out = Path(out)
    tmp = _atomic_path(out)
    try:
        w = gguf.GGUFWriter(str(tmp), family.gguf_arch)
        w.add_name(name)
        file_type = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                     torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[dtype]
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.hidden_size)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_head)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
        w.add_string(CONFIG_METADATA_KEY, json.dumps(asdict(cfg), sort_keys=True))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # our pre-tokenizer: tokenizers' ByteLevel with GPT-2's regex
        w.add_token_list(vocab.tokens)
        w.add_token_types([
            gguf.TokenType.CONTROL if i in vocab.special_ids
            else gguf.TokenType.NORMAL if i < vocab.n_tokenizer else gguf.TokenType.UNUSED
            for i in range(len(vocab.tokens))
        ])
        w.add_token_merges(vocab.merges)
        # every training document starts with end-of-text: it is the BOS llama.cpp prepends
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        for tensor_name, t in gguf_tensors(model, dtype).items():
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: gguf packs it (as bytes) from float32
                bf16 = gguf.GGMLQuantizationType.BF16
                w.add_tensor(tensor_name, gguf.quants.quantize(t.float().numpy(), bf16), raw_dtype=bf16)
            else:
                w.add_tensor(tensor_name, t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- Hugging Face


def hf_config(model: GPT, eot_id: int | None, dtype: torch.dtype = torch.float32) -> dict:
    """``config.json`` of the Llama/Arcee model equivalent to ``model``. RoPE's base
    is written both as ``rope_theta`` (transformers 4.x) and in ``rope_parameters`` (5.x)."""
    cfg = model.config
    family = llama_family(model)
    return {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.head_dim,
        "hidden_act": family.hf_hidden_act,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The weights under transformers' Llama names (our RoPE convention is HF's:
    q and k keep their row order)."""
    cfg = model.config
    llama_family(model)
    state = _cpu_state(model, dtype)
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[p + "attn.qkv.weight"], cfg.d_model)
        out.update({
            h + "input_layernorm.weight": state[p + "attn_norm.weight"],
            h + "self_attn.q_proj.weight": q,
            h + "self_attn.k_proj.weight": k,
            h + "self_attn.v_proj.weight": v,
            h + "self_attn.o_proj.weight": state[p + "attn.proj.weight"],
            h + "post_attention_layernorm.weight": state[p + "ffn_norm.weight"],
            h + "mlp.up_proj.weight": state[p + "ffn.up.weight"],
            h + "mlp.down_proj.weight": state[p + "ffn.down.weight"],
        })
        if cfg.ffn == "swiglu":
            out[h + "mlp.gate_proj.weight"] = state[p + "ffn.gate.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def export_hf(model: GPT, tokenizer_json: str | Path | None, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads
    (``config.json``, ``model.safetensors``) and, with a tokenizer, ``tokenizer.json``
    + ``tokenizer_config.json`` for ``AutoTokenizer``. Files are written to temporary
    names and renamed, so an interrupted export never leaves a truncated one."""
    save_file = _import("safetensors.torch").save_file

    out = Path(out)
    eot = None
    if tokenizer_json is not None:
        vocab = read_bpe_vocab(tokenizer_json, model.config.vocab_size)
        eot = vocab.tokens.index(EOT) if EOT in vocab.tokens else None
    config = hf_config(model, eot, dtype)
    files: dict[str, bytes | dict[str, torch.Tensor]] = {
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": json.dumps({"bos_token_id": eot, "eos_token_id": eot}, indent=2).encode(),
        "model.safetensors": hf_state_dict(model, dtype),
    }
    if tokenizer_json is not None:
        files["tokenizer.json"] = Path(tokenizer_json).read_bytes()
        files["tokenizer_config.json"] = json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.seq_len,
            "bos_token": EOT, "eos_token": EOT, "add_prefix_space": False,
        }, indent=2).encode()
    out.mkdir(parents=True, exist_ok=True)
    for fname, content in files.items():
        tmp = _atomic_path(out / fname)
        try:
            if isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                save_file(content, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, out / fname)
        finally:
            tmp.unlink(missing_ok=True)
    for fname in set(HF_FILES) - set(files):  # an earlier export's (--force): not this model's
        (out / fname).unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- entry point


def export_run(ckpt: str | Path, fmt: str, out: str | Path, force: bool = False, dtype: str = "float32") -> Path:
    """Export the run (directory or ``ckpt.pt``) ``ckpt`` as ``fmt`` to ``out``.
    Raises :class:`SparsetrainError` (one line) on bad input, before writing anything."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    _check_output(out, want_dir=fmt == "hf", force=force)
    run = run_directory(ckpt)
    model = load_model(ckpt)  # the run's newest weights, as generate reads them
    tok = run / "tokenizer.json"
    if fmt == "safetensors":
        return export_safetensors(model, out, DTYPES[dtype])
    llama_family(model)
    if fmt == "gguf":
        if not tok.is_file():
            raise SparsetrainError(f"no tokenizer.json in {run}: a GGUF needs the vocabulary")
        return export_gguf(model, tok, out, DTYPES[dtype], name=run.name)
    return export_hf(model, tok if tok.is_file() else None, out, DTYPES[dtype])

