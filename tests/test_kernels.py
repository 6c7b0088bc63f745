"""Kernel dispatch policy: read from the environment once, changed only as a
whole (a new frozen object), and what the dispatching modules follow; a run's
policy comes from its config's [kernels] section and stays within that run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import requires_cuda
from sparsetrain import cross_entropy as ce
from sparsetrain import kernels
from sparsetrain.errors import ConfigError
from sparsetrain.kernels import KernelPolicy


def test_policy_reads_the_environment_it_is_given() -> None:
    assert KernelPolicy.from_env({}) == KernelPolicy()
    p = KernelPolicy.from_env({"SPARSETRAIN_CSLT_PLANS": "0", "SPARSETRAIN_ATTENTION_IMPL": "flash"})
    assert (p.cached_cslt_plans, p.attention_impl) == (False, "flash")
    assert KernelPolicy.from_env({"SPARSETRAIN_CSLT_PLANS": "1"}).cached_cslt_plans
    with pytest.raises(ConfigError, match=r"kernels.attention_impl \(default: \$SPARSETRAIN_ATTENTION_IMPL\) must be one of auto, cudnn, flash, recompute, got 'fast'"):
        KernelPolicy.from_env({"SPARSETRAIN_ATTENTION_IMPL": "fast"})
    with pytest.raises(ConfigError, match="kept_kernel_max_keep must be in"):
        KernelPolicy(kept_kernel_max_keep=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.attention_impl = "cudnn"  # type: ignore[misc]


def _unread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy as in a fresh process: not set, and the default not read yet."""
    monkeypatch.setattr(kernels, "_current", None)
    monkeypatch.setattr(kernels, "_DEFAULT", None)


def test_environment_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process policy comes from the environment at its first use; later changes
    of the environment do not reach running code (set the policy instead)."""
    _unread(monkeypatch)
    monkeypatch.setenv("SPARSETRAIN_ATTENTION_IMPL", "recompute")
    assert kernels.current().attention_impl == "recompute"
    monkeypatch.setenv("SPARSETRAIN_ATTENTION_IMPL", "flash")
    assert kernels.current().attention_impl == "recompute"


def test_using_scopes_a_change_and_restores_the_previous_policy() -> None:
    before = kernels.current()
    with kernels.using(fused_cross_entropy=False, cusparselt_min_width=0) as inside:
        assert kernels.current() is inside
        assert (inside.fused_cross_entropy, inside.cusparselt_min_width) == (False, 0)
        assert inside.attention_impl == before.attention_impl  # the rest unchanged
        assert ce.FUSED is False  # the old flag's read-only accessor follows the policy
    assert kernels.current() is before and ce.FUSED is before.fused_cross_entropy
    with pytest.raises(RuntimeError), kernels.using(KernelPolicy(attention_impl="flash")):
        raise RuntimeError("restored even so")
    assert kernels.current() is before


def test_availability_is_decided_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    assert kernels.triton_available() == (importlib.util.find_spec("triton") is not None)
    if not torch.cuda.is_available():
        assert not kernels.cusparselt_available() and not kernels.cudnn_attention_available()
    calls = []
    monkeypatch.setattr(kernels, "_AVAILABLE", {})
    monkeypatch.setattr(kernels, "_probe_cusparselt", lambda: calls.append(1) or True)
    assert kernels.cusparselt_available() and kernels.cusparselt_available() and calls == [1]


@requires_cuda
def test_cross_entropy_follows_the_policy_on_cuda() -> None:
    """Fused kernels by default; the plain-torch reference with ``fused_cross_entropy``
    off, process-wide or for one call."""
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    logits = torch.randn(64, 1000, device="cuda", generator=g).bfloat16()
    targets = torch.randint(0, 1000, (64,), device="cuda", generator=g)
    ref = ce.cross_entropy_reference(logits, targets)
    calls = []
    real = ce.fused_cross_entropy
    try:
        ce.fused_cross_entropy = lambda *a: calls.append(1) or real(*a)
        assert torch.allclose(ce.cross_entropy(logits, targets), ref, rtol=1e-5) and calls == [1]
        with kernels.using(fused_cross_entropy=False):
            assert torch.equal(ce.cross_entropy(logits, targets), ref) and calls == [1]
        assert torch.equal(ce.cross_entropy(logits, targets, KernelPolicy(fused_cross_entropy=False)), ref)
        assert calls == [1]
    finally:
        ce.fused_cross_entropy = real


# ----------------------------------------------------------------------------- the run's policy, from its config

KNOBS = dict(fused_cross_entropy=False, cached_cslt_plans=False, cusparselt_min_width=64, attention_impl="recompute",
             fused_hyper_mixing=False, kept_kernel_max_keep=0.3)
COLLIDER = dict(use_collider=True, collider_sparsity=0.5, collider_method="topk", eval_every=0, max_steps=2)


def test_kernels_section_holds_the_policy_with_its_defaults() -> None:
    """[kernels] carries exactly the policy's fields, and its defaults (no environment)
    are the policy's: a run configured by default dispatches as before."""
    from sparsetrain.config import ENV_DEFAULTS, TrainConfig, env_default

    cfg = TrainConfig(**{name: env_default(name, {}) for name in ENV_DEFAULTS})
    assert list(cfg.to_dict()["kernels"]) == [f.name for f in dataclasses.fields(KernelPolicy)]
    assert KernelPolicy.from_config(cfg) == KernelPolicy() == KernelPolicy.from_env({})


def test_environment_is_read_into_the_config_default_once(monkeypatch: pytest.MonkeyPatch, make_cfg) -> None:
    """SPARSETRAIN_ATTENTION_IMPL / SPARSETRAIN_CSLT_PLANS become the defaults of their
    fields when a config is built, one read each; a file or a flag wins; nothing
    reads them again (not the trainer, not a step)."""
    import sparsetrain.config as C
    from sparsetrain import Trainer

    reads = []
    real = C.env_default
    monkeypatch.setattr(C, "env_default", lambda name, environ=None: reads.append(name) or real(name, environ))
    monkeypatch.setenv("SPARSETRAIN_ATTENTION_IMPL", "recompute")
    monkeypatch.setenv("SPARSETRAIN_CSLT_PLANS", "0")
    cfg = make_cfg(max_steps=1, eval_every=0)
    assert (cfg.attention_impl, cfg.cached_cslt_plans) == ("recompute", False)
    assert sorted(reads) == ["attention_impl", "cached_cslt_plans"]
    assert make_cfg(attention_impl="flash", cached_cslt_plans=True).attention_impl == "flash"  # a flag wins
    reads.clear()
    monkeypatch.setenv("SPARSETRAIN_ATTENTION_IMPL", "flash")  # too late for cfg
    t = Trainer(cfg, verbose=False)
    t.train_step()
    t.evaluate()
    assert reads == [] and t.kernel_policy.attention_impl == "recompute" and not t.kernel_policy.cached_cslt_plans


@pytest.mark.parametrize("overrides, needle", [
    ({"attention_impl": "fast"}, "kernels.attention_impl (default: $SPARSETRAIN_ATTENTION_IMPL) must be one of "
                                 "auto, cudnn, flash, recompute, got 'fast'"),
    ({"cusparselt_min_width": -1}, "kernels.cusparselt_min_width must be >= 0, got -1"),
    ({"kept_kernel_max_keep": 1.5}, "kernels.kept_kernel_max_keep must be in [0, 1], got 1.5"),
    ({"fused_cross_entropy": "maybe"}, "fused_cross_entropy must be true or false, got 'maybe'"),
])
def test_bad_kernel_settings_are_refused_in_one_line(overrides: dict, needle: str) -> None:
    from sparsetrain.config import build_config

    with pytest.raises(ConfigError) as e:
        build_config("tiny", overrides=overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_kernel_settings_from_the_environment_file_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    from sparsetrain.cli import main
    from sparsetrain.config import build_config

    monkeypatch.setenv("SPARSETRAIN_ATTENTION_IMPL", "fast")
    with pytest.raises(ConfigError, match=r"\$SPARSETRAIN_ATTENTION_IMPL\) must be one of .*, got 'fast'"):
        build_config("tiny")
    assert build_config("tiny", overrides={"attention_impl": "cudnn"}).attention_impl == "cudnn"
    monkeypatch.delenv("SPARSETRAIN_ATTENTION_IMPL")
    path = tmp_path / "c.toml"
    path.write_text('[run]\nattention_impl = "flash"\n')
    with pytest.raises(ConfigError, match=r"belongs in \[kernels\]"):
        build_config("tiny", config_file=path)
    path.write_text('[kernels]\nattention_impl = "flash"\nkept_kernel_max_keep = 0.5\n')
    cfg = build_config("tiny", config_file=path)
    assert (cfg.attention_impl, cfg.kept_kernel_max_keep) == ("flash", 0.5)
    assert main(["train", "--dry-run", "--attention-impl", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention-impl" in err[0] and "got 'fast'" in err[0], err


class _Reads:
    """Every policy the dispatching modules read (``kernels.current()``), forward and backward."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.policies: list[KernelPolicy] = []
        real = kernels.current
        monkeypatch.setattr(kernels, "current", lambda: self.policies.append(real()) or self.policies[-1])

    def take(self) -> list[KernelPolicy]:
        out, self.policies = self.policies, []
        return out


def test_trainer_builds_its_policy_from_the_config_and_its_modules_use_it(make_cfg, monkeypatch) -> None:
    """Each knob set in the config reaches the run: the policy the trainer holds, the
    2:4 FFNs that take one (given it, not reading the process's), and every read of the
    current policy in a step and an evaluation (Collider's attention and loss, the
    cross-entropy). (The priming's kept-kernel bound: tests/test_prime_startup.py.)"""
    from sparsetrain import Trainer

    import sparsetrain.collider.gpt_block as gb

    impls = []
    real_forward = gb.attention_forward
    monkeypatch.setattr(gb, "attention_forward",
                        lambda *a: impls.append(kernels.current().attention_impl) or real_forward(*a))
    reads = _Reads(monkeypatch)
    outside = KernelPolicy(attention_impl="flash", cusparselt_min_width=4096)
    with kernels.using(outside):  # a process-wide policy set elsewhere does not reach the run
        t = Trainer(make_cfg(**COLLIDER, **KNOBS, ffn="relu2_24", activation_sparse_method="transposable"), verbose=False)
        assert t.kernel_policy == KernelPolicy(**KNOBS)
        assert t.sparse_ffns and all(m.policy is t.kernel_policy for m in t.sparse_ffns)
        reads.take()
        t.train_step()
        t.evaluate()
        seen = reads.take()
        assert seen and all(p is t.kernel_policy for p in seen)
        assert impls and set(impls) == {"recompute"}
        assert kernels.current() is outside  # restored after each step


def test_two_trainers_in_one_process_keep_their_own_policies(make_cfg, tmp_path, monkeypatch) -> None:
    """Interleaved steps of two runs with different [kernels] settings: every read in a
    run's step sees that run's policy, and neither changes the process's default."""
    from sparsetrain import Trainer

    reads = _Reads(monkeypatch)
    before = kernels.current()
    a = Trainer(make_cfg(out_dir=str(tmp_path / "a"), **COLLIDER, **KNOBS), verbose=False)
    b = Trainer(make_cfg(out_dir=str(tmp_path / "b"), **COLLIDER, attention_impl="flash", fused_cross_entropy=True),
                verbose=False)
    assert a.kernel_policy != b.kernel_policy
    for t in (a, b, a, b):
        reads.take()
        t.train_step()
        seen = reads.take()
        assert seen and all(p is t.kernel_policy for p in seen), t.cfg.out_dir
        assert kernels.current() is before
    reads.take()
    b.evaluate()
    seen = reads.take()
    assert seen and all(p is b.kernel_policy for p in seen)


def test_a_cudnn_failure_turns_cudnn_off_for_its_engine_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN attention that raises: the engine falls back (here to the recompute path) and
    stops trying cuDNN; another engine in the process still tries it, once."""
    import sparsetrain.collider.attention as A
    from sparsetrain.collider import ColliderModel
    from sparsetrain.config import ModelConfig
    from sparsetrain.model import GPT

    tried = []

    def refuse(*args, **kwargs):
        tried.append(1)
        raise RuntimeError("cuDNN refuses this shape")

    def no_flash(*args, **kwargs):
        raise RuntimeError("no flash here")

    monkeypatch.setattr(A, "_fused_ok", lambda q: True)  # as on a CUDA device in 16-bit
    monkeypatch.setattr(kernels, "cudnn_attention_available", lambda: True)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", refuse, raising=False)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", no_flash, raising=False)
    cfg = ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32)
    first, second = ColliderModel(GPT(cfg)), ColliderModel(GPT(cfg))
    idx = torch.randint(0, 300, (2, 16))
    with kernels.using(attention_impl="auto"):
        first(idx).sum().backward()
        assert len(tried) == 1 and first._cudnn.failed  # the first layer's failure; the second layer skips cuDNN
        first(idx).sum().backward()
        assert len(tried) == 1
        second(idx).sum().backward()
        assert len(tried) == 2 and second._cudnn.failed
        _, saved = A.attention_forward(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
        assert saved.flash is None and len(tried) == 3  # no engine's state: tried, nothing remembered


@requires_cuda
@pytest.mark.parametrize("impl, used", [("flash", "flash"), ("recompute", None)])
def test_trainer_attention_impl_chooses_the_collider_kernel_on_cuda(impl: str, used, make_cfg, monkeypatch) -> None:
    """On the GPU the run's attention_impl picks the kernel Collider's attention runs,
    whatever the process's policy says."""
    from sparsetrain import Trainer

    import sparsetrain.collider.gpt_block as gb

    kinds = []
    real_forward = gb.attention_forward

    def spy(*args):
        out, saved = real_forward(*args)
        kinds.append(saved.flash[0] if saved.flash else None)
        return out, saved

    monkeypatch.setattr(gb, "attention_forward", spy)
    with kernels.using(attention_impl="cudnn" if impl == "recompute" else "recompute"):
        t = Trainer(make_cfg(**COLLIDER, attention_impl=impl, device="cuda", dtype="bfloat16", n_head=2, d_model=128),
                    verbose=False)
        t.train_step()
    if impl == "flash" and None in kinds:
        pytest.skip("flash attention does not run here")
    assert kinds and set(kinds) == {used}


# ----------------------------------------------------------------------------- under torch.compile

def _compile_backend() -> str:
    """Inductor compiles CPU graphs with a C++ compiler; without one, aot_eager (as tests/test_hyper.py)."""
    import shutil

    return "inductor" if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "aot_eager"


def test_first_read_of_the_policy_in_a_compiled_model_does_not_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled GPT's first call is where the process's policy is first read (cross_entropy's
    default): its graph must not be guarded on the policy being unread, or every compiled run
    recompiles at its second step. Forward and backward, three calls, no recompilation."""
    from sparsetrain.build import build_model
    from sparsetrain.config import ModelConfig

    _unread(monkeypatch)  # a fresh process: nothing has read the policy yet
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_compile_backend(), fullgraph=True)
    for step in range(3):
        idx, tgt = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss = compiled(idx, tgt)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)
    torch._dynamo.reset()


def test_compiled_code_follows_a_policy_changed_by_using(monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed policy still reaches compiled code (a recompile, as any changed guard), and
    the default back again runs the first graph; the default's first read adds none."""
    _unread(monkeypatch)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()

    @torch.compile(backend="eager", fullgraph=True)
    def f(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if kernels.current().fused_cross_entropy else x - 1

    x = torch.zeros(3)
    assert torch.equal(f(x), x + 1) and torch.equal(f(x), x + 1)
    frames = counts["stats"]["unique_graphs"]
    assert frames == 1
    with kernels.using(fused_cross_entropy=False):
        assert torch.equal(f(x), x - 1) and torch.equal(f(x), x - 1)
    assert torch.equal(f(x), x + 1)
    assert counts["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
