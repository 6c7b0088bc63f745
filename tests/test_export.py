"""Export: a GGUF read back with gguf's reader and run by a naive float64 NumPy
forward (llama.cpp's adjacent-pair RoPE) gives the PyTorch logits; its vocabulary
re-tokenizes text exactly by a naive BPE; safetensors round-trips; the HF folder
loads in transformers with matching logits; bad input is one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")

from sparsetrain.checkpoint import save_checkpoint  # noqa: E402
from sparsetrain.cli import main  # noqa: E402
from sparsetrain.config import ModelConfig  # noqa: E402
from sparsetrain.export import (  # noqa: E402
    CONFIG_METADATA_KEY,
    export_gguf,
    export_hf,
    export_safetensors,
    interleave_rope_rows,
    load_safetensors,
)
from sparsetrain.generate import load_model  # noqa: E402
from sparsetrain.build import build_model  # noqa: E402
from sparsetrain.model import GPT, RMSNorm, rope_tables  # noqa: E402
from sparsetrain.tokenizer import BPETokenizer  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b  # sum\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
         "naïve café — ünïcode 😀 'quoted' 123 4567\n\n\tindent\n"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train(TEXTS * 20, 300).save(path)
    return path


def random_model(seed: int = 0, **overrides) -> GPT:
    """A GPT whose every parameter matters: init_std 0.2 makes attention sharp
    (so RoPE's pairing shows in the logits), norm gains are random, and RoPE's base
    and the norm eps are not the defaults (the eps a power of two: GGUF stores it
    as float32, which rounds 1e-3 by 5e-8 of itself)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, seq_len=24, n_layer=2, n_head=2, d_model=32, ffn="swiglu", init_std=0.2,
              rope_theta=500.0, norm_eps=2.0**-10)
    kw.update(overrides)
    model = build_model(ModelConfig(**kw))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
    return model.eval()


def float64_model(model: GPT) -> GPT:
    """``model`` in float64, RoPE tables included (its float32 tables would differ from
    exact float64 angles by ~1e-7)."""
    model = model.double()
    cfg = model.config
    model.rope_cos, model.rope_sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta, torch.float64)
    return model


# ----------------------------------------------------------------------------- GGUF


def gguf_value(reader, key: str):
    return reader.fields[key].contents()


def gguf_arrays(reader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = data.astype(np.float64)
    return out


def rope_numpy(x: np.ndarray, base: float, n_rot: int, adjacent: bool) -> np.ndarray:
    """x [T, H, hd]: rotate pairs (2i, 2i+1) (llama.cpp's normal RoPE) or (i, i + hd/2)
    by the angle pos * base^(-2i/n_rot)."""
    T, _, hd = x.shape
    angle = np.arange(T)[:, None] * base ** (-np.arange(0, n_rot, 2) / n_rot)[None, :]  # [T, hd/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = (x[..., 0::2], x[..., 1::2]) if adjacent else (x[..., : hd // 2], x[..., hd // 2 :])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if adjacent:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : hd // 2], out[..., hd // 2 :] = ra, rb
    return out


def numpy_gguf_forward(path: Path, tokens: np.ndarray, adjacent_rope: bool = True) -> np.ndarray:
    """Logits [T, V] of a llama/arcee GGUF, read with GGUFReader: every
    hyperparameter from its metadata, float64 throughout, loops where clearer."""
    r = gguf.GGUFReader(str(path))
    arch = gguf_value(r, "general.architecture")
    n_layer, n_head = gguf_value(r, f"{arch}.block_count"), gguf_value(r, f"{arch}.attention.head_count")
    eps = gguf_value(r, f"{arch}.attention.layer_norm_rms_epsilon")
    base, n_rot = gguf_value(r, f"{arch}.rope.freq_base"), gguf_value(r, f"{arch}.rope.dimension_count")
    w = gguf_arrays(r)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    T = tokens.size
    x = w["token_embd.weight"][tokens]
    for layer in range(n_layer):
        p = f"blk.{layer}."
        h = rms(x, w[p + "attn_norm.weight"])
        q, k, v = (h @ w[p + f"attn_{n}.weight"].T for n in "qkv")
        hd = q.shape[1] // n_head
        q, k, v = (a.reshape(T, n_head, hd) for a in (q, k, v))
        q, k = rope_numpy(q, base, n_rot, adjacent_rope), rope_numpy(k, base, n_rot, adjacent_rope)
        att = np.zeros((T, n_head, hd))
        for head in range(n_head):
            for t in range(T):
                s = k[: t + 1, head] @ q[t, head] / np.sqrt(hd)
                e = np.exp(s - s.max())
                att[t, head] = (e / e.sum()) @ v[: t + 1, head]
        x = x + att.reshape(T, -1) @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        up = h @ w[p + "ffn_up.weight"].T
        if arch == "llama":
            g = h @ w[p + "ffn_gate.weight"].T
            act = g / (1 + np.exp(-g)) * up
        else:
            assert arch == "arcee"
            act = np.maximum(up, 0) ** 2
        x = x + act @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])  # llama.cpp: no output.weight = tied
    return rms(x, w["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("ffn, tied, arch", [("swiglu", False, "llama"), ("relu2", False, "arcee"),
                                             ("swiglu", True, "llama"), ("relu2", True, "arcee")])
def test_gguf_numpy_forward_matches_pytorch(ffn: str, tied: bool, arch: str, tokenizer_json: Path, tmp_path: Path) -> None:
    model = random_model(ffn=ffn, tie_embeddings=tied)
    export_gguf(model, tokenizer_json, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert gguf_value(reader, "general.architecture") == arch
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not tied)
    assert gguf_value(reader, f"{arch}.context_length") == 24
    assert gguf_value(reader, f"{arch}.feed_forward_length") == model.config.hidden_size
    assert json.loads(gguf_value(reader, CONFIG_METADATA_KEY)) == asdict(model.config)
    tokens = np.random.default_rng(0).integers(0, 320, 24)
    with torch.no_grad():
        want = float64_model(model)(torch.from_numpy(tokens)[None])[0][0].numpy()
    got = numpy_gguf_forward(tmp_path / "m.gguf", tokens)
    # float64 on both sides, with the same operations in another order
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
    # control: reading the same file with our (first half, second half) pairing is far off,
    # so the q/k row interleaving is what makes llama.cpp's pairing right
    wrong = numpy_gguf_forward(tmp_path / "m.gguf", tokens, adjacent_rope=False)
    assert np.abs(wrong - want).max() > 1e-2


def test_interleave_rope_rows_pairs_halves_per_head() -> None:
    n_head, hd, cols = 3, 8, 5
    w = torch.randn(n_head * hd, cols)
    out = interleave_rope_rows(w, n_head)
    for h in range(n_head):
        for i in range(hd // 2):
            assert torch.equal(out[h * hd + 2 * i], w[h * hd + i])
            assert torch.equal(out[h * hd + 2 * i + 1], w[h * hd + hd // 2 + i])


@pytest.mark.parametrize("dtype, qtype", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_gguf_half_precision_matrices_norms_float32(dtype: torch.dtype, qtype: str, tokenizer_json: Path, tmp_path: Path) -> None:
    model = random_model(ffn="relu2")
    export_gguf(model, tokenizer_json, tmp_path / "m.gguf", dtype=dtype)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    w = gguf_arrays(r)
    assert types["output_norm.weight"] == "F32"
    np.testing.assert_array_equal(w["output_norm.weight"], model.norm.weight.detach().double().numpy())
    assert types["blk.1.ffn_down.weight"] == qtype
    np.testing.assert_array_equal(w["blk.1.ffn_down.weight"], model.blocks[1].ffn.down.weight.detach().to(dtype).double().numpy())
    v = model.blocks[0].attn.qkv.weight.detach()[64:]
    np.testing.assert_array_equal(w["blk.0.attn_v.weight"], v.to(dtype).double().numpy())


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (written out from its definition)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def naive_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    import regex

    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    byte_map = bytes_to_unicode()
    out = []
    for word in pat.findall(text):
        parts = [byte_map[b] for b in word.encode()]
        while len(parts) > 1:
            rank, i = min((ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == float("inf"):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out += [ids[p] for p in parts]
    return out


def test_gguf_vocabulary_retokenizes_exactly(tokenizer_json: Path, tmp_path: Path) -> None:
    tok = BPETokenizer.load(tokenizer_json)
    export_gguf(random_model(vocab_size=300 + 37), tokenizer_json, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tokens = gguf_value(r, "tokenizer.ggml.tokens")
    merges = gguf_value(r, "tokenizer.ggml.merges")
    types = gguf_value(r, "tokenizer.ggml.token_type")
    assert gguf_value(r, "tokenizer.ggml.model") == "gpt2" and gguf_value(r, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == 337 == len(types)
    n = tok.vocab_size
    assert all(tokens[i] == f"[PAD{i}]" and types[i] == gguf.TokenType.UNUSED for i in range(n, 337))
    assert tokens[tok.eot_id] == "<|endoftext|>" and types[tok.eot_id] == gguf.TokenType.CONTROL
    assert gguf_value(r, "tokenizer.ggml.bos_token_id") == tok.eot_id == gguf_value(r, "tokenizer.ggml.eos_token_id")
    assert sum(t == gguf.TokenType.NORMAL for t in types) == n - 1
    for text in TEXTS + ["a brand new line with wörds and 42 numbers\n    def f(x): return x**2\n"]:
        assert naive_bpe(text, tokens, merges) == tok.encode(text)
        assert tok.decode(naive_bpe(text, tokens, merges)) == text


LLAMA_CPP_PROBE = os.environ.get("SPARSETRAIN_LLAMA_CPP_PROBE", "")


@pytest.mark.skipif(not LLAMA_CPP_PROBE, reason="set SPARSETRAIN_LLAMA_CPP_PROBE to a built tests/llama_cpp_probe.cpp")
@pytest.mark.parametrize("ffn, tied", [("swiglu", False), ("relu2", True)])
def test_gguf_runs_in_llama_cpp(ffn: str, tied: bool, tokenizer_json: Path, tmp_path: Path) -> None:
    """The real consumer: llama.cpp loads the file as llama/arcee, gives the float64
    model's logits up to float32 rounding, and tokenizes as we do (BOS = end-of-text)."""
    model = random_model(ffn=ffn, tie_embeddings=tied)
    export_gguf(model, tokenizer_json, tmp_path / "m.gguf")
    tokens = np.random.default_rng(2).integers(0, 320, 24)
    subprocess.run([LLAMA_CPP_PROBE, str(tmp_path / "m.gguf"), "logits", str(tmp_path / "out.f32"), *map(str, tokens)],
                   check=True, capture_output=True)
    got = np.fromfile(tmp_path / "out.f32", dtype=np.float32).reshape(24, -1)
    with torch.no_grad():
        want = float64_model(model)(torch.from_numpy(tokens)[None])[0][0].numpy()
    # float32 arithmetic in llama.cpp over 2 layers: a few 1e-6 on logits of magnitude ~5
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
    text = "".join(TEXTS) + "a brand new line with wörds and 42 numbers\n    def f(x): return x**2\n"
    (tmp_path / "text.txt").write_text(text)
    out = subprocess.run([LLAMA_CPP_PROBE, str(tmp_path / "m.gguf"), "tok", str(tmp_path / "text.txt")],
                         check=True, capture_output=True, text=True).stdout
    tok = BPETokenizer.load(tokenizer_json)
    assert list(map(int, out.split())) == [tok.eot_id] + tok.encode(text)


# ----------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("overrides", [dict(ffn="swiglu"), dict(ffn="relu2", tie_embeddings=True),
                                       dict(ffn="relu2_24", activation_dense_warmup_steps=0),
                                       dict(ffn="relu2", hyper_connections=2),
                                       dict(arch="resnet_bk", ffn="relu2", bk_num_experts=2)])
def test_safetensors_round_trip(overrides: dict, tmp_path: Path) -> None:
    from safetensors import safe_open

    model = random_model(**overrides)
    export_safetensors(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[CONFIG_METADATA_KEY]) == asdict(model.config)
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_embeddings)
    back = load_safetensors(tmp_path / "m.safetensors")
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    if model.config.tie_embeddings:
        assert back.lm_head.weight is back.embed.weight
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(x)[0], back(x)[0])


def test_safetensors_half_precision(tmp_path: Path) -> None:
    model = random_model()
    export_safetensors(model, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    back = load_safetensors(tmp_path / "m.safetensors")
    assert back.embed.weight.dtype == torch.bfloat16
    assert torch.equal(back.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight.to(torch.bfloat16))


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("ffn, tied, cls", [("swiglu", False, "LlamaForCausalLM"), ("swiglu", True, "LlamaForCausalLM"),
                                            ("relu2", False, "ArceeForCausalLM"),
                                            ("relu2_24", True, "ArceeForCausalLM")])  # still in its dense warmup
def test_hf_folder_loads_in_transformers_with_our_logits(ffn: str, tied: bool, cls: str, tokenizer_json: Path,
                                                         tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = random_model(ffn=ffn, tie_embeddings=tied)
    export_hf(model, tokenizer_json, tmp_path / "hf")
    hf = getattr(transformers, cls).from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")).__name__ == cls
    assert hf.config.rms_norm_eps == 2.0**-10 and hf.config.max_position_embeddings == 24
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        want = float64_model(model)(x)[0]
        got = hf(x).logits
    # transformers' RMSNorm rounds its normalised activations to float32 even in a
    # float64 model (5 norms here, 2^-24 relative each, amplified by the layers after
    # them): measured ~2e-7 of the logits' scale; a wrong mapping is off by > 1e-2
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 5e-6 * scale
    # control: the GGUF's interleaved q/k rows in an HF model are far off
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(interleave_rope_rows(proj.weight, 2))
        assert (hf(x).logits - want).abs().max().item() > 1e-2
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = BPETokenizer.load(tokenizer_json)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text)


# ----------------------------------------------------------------------------- the CLI


def write_run(folder: Path, model: GPT, tokenizer_json: Path | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "ckpt.pt", {"model": model.state_dict(), "model_config": asdict(model.config)})
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return folder


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_export_cli_trained_run_all_formats(make_cfg, tmp_path: Path, capsys) -> None:
    from sparsetrain.trainer import train

    cfg = make_cfg(ffn="swiglu", max_steps=4)
    run = train(cfg, verbose=False).out_dir
    model = load_model(run)
    for fmt, out in (("gguf", "m.gguf"), ("safetensors", "m.safetensors"), ("hf", "hf")):
        code, stdout, _ = run_cli(["export", "--ckpt", str(run), "--format", fmt, "--out", str(tmp_path / out)], capsys)
        assert code == 0 and str(tmp_path / out) in stdout
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, cfg.model.seq_len)
    with torch.no_grad():
        want = float64_model(model)(torch.from_numpy(tokens)[None])[0][0].numpy()
        back = float64_model(load_safetensors(tmp_path / "m.safetensors"))(torch.from_numpy(tokens)[None])[0][0].numpy()
    # the run's eps 1e-6 is stored as float32 in the GGUF (2.5e-15 off): ~1e-12 in the logits
    np.testing.assert_allclose(numpy_gguf_forward(tmp_path / "m.gguf", tokens), want, rtol=0, atol=1e-8)
    np.testing.assert_array_equal(back, want)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # an existing output needs --force
    args = ["export", "--ckpt", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--force" in err
    assert run_cli(args + ["--force"], capsys)[0] == 0
    # not even --force writes over the run it exports from
    before = {p.name: p.read_bytes() for p in Path(run).iterdir() if p.is_file()}
    for fmt, out, needle in (("gguf", Path(run) / "ckpt.pt", "is a file of the run"), ("hf", Path(run), "is a run folder")):
        code, _, err = run_cli(["export", "--ckpt", str(run), "--format", fmt, "--out", str(out), "--force"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert {p.name: p.read_bytes() for p in Path(run).iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    "overrides, fmt, tokenizer, needles",
    [
        (dict(ffn="relu2_24", activation_dense_warmup_steps=0), "hf", True, ["relu2_24", "safetensors"]),
        (dict(ffn="relu2_24", activation_dense_warmup_steps=0), "gguf", True, ["relu2_24", "2:4"]),
        (dict(ffn="relu2", hyper_connections=2), "hf", True, ["hyper_connections"]),
        (dict(arch="resnet_bk", ffn="relu2", bk_num_experts=2), "gguf", True, ["resnet_bk"]),
        (dict(ffn="swiglu"), "gguf", False, ["tokenizer.json"]),
    ],
)
def test_export_refuses_what_has_no_equivalent(overrides: dict, fmt: str, tokenizer: bool, needles: list[str],
                                               tokenizer_json: Path, tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "run", random_model(**overrides), tokenizer_json if tokenizer else None)
    out = tmp_path / "out"
    code, _, err = run_cli(["export", "--ckpt", str(run), "--format", fmt, "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["export", "--ckpt", "/no/such/run", "--format", "gguf", "--out", "x.gguf"], "/no/such/run"),
        (["export", "--ckpt", ".", "--format", "onnx", "--out", "x"], "onnx"),
        (["export", "--ckpt", ".", "--format", "gguf", "--out", "x", "--dtype", "int4"], "int4"),
    ],
)
def test_export_bad_input_one_line_exit_2(args: list[str], needle: str, capsys) -> None:
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0]


def test_export_and_eval_read_the_runs_newest_weights(make_cfg, tmp_path: Path, capsys) -> None:
    """A run directory whose weights-only file is newer than its ckpt.pt (as after a
    resume whose full checkpoint went elsewhere: an FSDP run's is sharded) exports and
    evaluates those weights, as load_model(run) and generate read them; a folder with
    neither is refused in one line."""
    from sparsetrain.checkpoint import WEIGHTS_NAME, save_weights
    from sparsetrain.evaluate import load_run
    from sparsetrain.trainer import train

    cfg = make_cfg(ffn="swiglu", max_steps=2)
    run = train(cfg, verbose=False).out_dir
    old = load_model(run)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    newer = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in old.state_dict().items()}
    save_weights(Path(run) / WEIGHTS_NAME, newer, dataclasses.asdict(old.config), 9)
    want = load_model(run)
    assert all(not torch.equal(want.state_dict()[k], old.state_dict()[k]) for k in newer)
    code, _, _ = run_cli(["export", "--ckpt", str(run), "--format", "safetensors", "--out", str(tmp_path / "m.st")],
                         capsys)
    assert code == 0
    back = load_safetensors(tmp_path / "m.st")
    for k, v in want.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    loaded = load_run(run).model
    for k, v in want.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["export", "--ckpt", str(tmp_path / "empty"), "--format", "safetensors",
                            "--out", str(tmp_path / "e.st")], capsys)
    assert code == 2 and "no checkpoint at" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, named", [
    (lambda spec: spec.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated"}),
     "pre-tokenizer Split"),
    (lambda spec: spec["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer ByteLevel"),
    (lambda spec: spec.update(normalizer={"type": "NFKC"}), "normalizer NFKC"),
])
def test_gguf_refuses_a_tokenizer_that_splits_text_otherwise(edit, named: str, tokenizer_json: Path,
                                                            tmp_path: Path, capsys) -> None:
    """A GGUF declares the gpt-2 pre-tokenizer: a tokenizer.json that splits text
    another way (the same vocabulary and merges) is refused in one line, before a
    file is written; safetensors and hf (which carry the tokenizer.json as is) export it."""
    spec = json.loads(tokenizer_json.read_text())
    edit(spec)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(spec))
    run = write_run(tmp_path / "run", random_model(), other)
    code, _, err = run_cli(["export", "--ckpt", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")], capsys)
    assert code == 2 and named in err and "gpt-2" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.gguf").exists()
    assert run_cli(["export", "--ckpt", str(run), "--format", "hf", "--out", str(tmp_path / "hf")], capsys)[0] == 0


def test_hf_export_over_an_earlier_one_leaves_none_of_its_files(tokenizer_json: Path, tmp_path: Path, capsys) -> None:
    """--force over a folder exported from a run with a tokenizer, from a run without:
    the earlier tokenizer files go, so the folder describes one model."""
    with_tok = write_run(tmp_path / "a", random_model(), tokenizer_json)
    without = write_run(tmp_path / "b", random_model(seed=1), None)
    out = tmp_path / "hf"
    assert run_cli(["export", "--ckpt", str(with_tok), "--format", "hf", "--out", str(out)], capsys)[0] == 0
    assert (out / "tokenizer.json").is_file()
    assert run_cli(["export", "--ckpt", str(without), "--format", "hf", "--out", str(out), "--force"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
