"""The backend choice of the p-Laplacian block (vlpeft/functional/p_laplacian/backend.py): one function decides the
attention path (fused Triton / blocked eager / the model's eager attention) and the aggregation kernel (fused C
kernels / torch), says why, and honours the override (argument or config field, then VLPEFT_BACKEND)."""

from __future__ import annotations

import logging

import pytest
import torch
from _p_laplacian_references import make_attention, make_features

from vlpeft.functional import p_laplacian_aggregate
from vlpeft.functional.p_laplacian import backend, cpu_kernels, paper, release, triton_support
from vlpeft.functional.p_laplacian.backend import (
    AggregationFacts,
    AttentionFacts,
    BackendChoice,
    BackendUnavailableError,
    choose_backend,
    combine_choices,
    log_choice,
    recording_backends,
)

needs_kernel = pytest.mark.skipif(not cpu_kernels.kernel_available(), reason="no C compiler: fused CPU kernels not built")


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("VLPEFT_BACKEND", raising=False)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)


@pytest.fixture
def triton_here(monkeypatch):
    """Pretend Triton and a CUDA device are present (the choice itself never launches a kernel)."""
    monkeypatch.setattr(triton_support, "triton_unavailable_reason", lambda: None)


def test_attention_paths_and_their_reasons(triton_here):
    fused = choose_backend(AttentionFacts(fused=None, blocked=None))
    assert (fused.name, fused.attention, fused.requested) == ("triton", "fused", "auto")
    assert "fused Triton kernels compute the attention and the aggregation" in fused.reason
    blocked = choose_backend(AttentionFacts(fused="KV-cached queries (n_q=1, n_k=9)", blocked=None))
    assert (blocked.name, blocked.attention) == ("torch", "blocked")
    assert blocked.reason == "blocked eager attention in torch (no fused Triton kernels: KV-cached queries (n_q=1, n_k=9))"
    eager = choose_backend(AttentionFacts(fused="not requested", blocked="one row block"))
    assert (eager.name, eager.attention) == ("torch", "eager")
    assert "no blocked attention: one row block" in eager.reason and "no fused Triton kernels: not requested" in eager.reason
    assert str(eager).startswith("torch (attention: eager): the model's own eager attention")


def test_aggregation_kernel_and_its_reasons(monkeypatch):
    blocked = choose_backend(AggregationFacts("they take float32 CPU tensors, got float64 on cpu", threads=1, graphs=4))
    assert (blocked.name, blocked.attention) == ("torch", None)
    assert blocked.reason == ("aggregation in torch (the fused C kernels do not apply: they take float32 CPU tensors, "
                              "got float64 on cpu)")
    crowded = choose_backend(AggregationFacts(None, threads=3, graphs=1))
    assert crowded.name == "torch" and "3 torch threads for 1 graph(s)" in crowded.reason
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    off = choose_backend(AggregationFacts(None, threads=1, graphs=4))
    assert off.name == "torch" and "VLPEFT_CPU_KERNEL=0 (deprecated: use VLPEFT_BACKEND=torch)" in off.reason
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "sometimes")
    with pytest.raises(ValueError, match="VLPEFT_CPU_KERNEL must be one of"):
        choose_backend(AggregationFacts(None, threads=1, graphs=4))


@needs_kernel
def test_aggregation_kernel_where_it_applies():
    choice = choose_backend(AggregationFacts(None, threads=2, graphs=1))
    assert choice == BackendChoice("cpu", "aggregation by the fused C kernels (float32 CPU tensors, 2 thread(s) for "
                                   "1 graph(s))")


def test_environment_override(monkeypatch, triton_here):
    monkeypatch.setenv("VLPEFT_BACKEND", "torch")
    attention = choose_backend(AttentionFacts(fused=None, blocked=None))
    assert (attention.name, attention.attention, attention.requested) == ("torch", "blocked", "torch")
    assert "fused Triton kernels off by VLPEFT_BACKEND=torch" in attention.reason
    aggregation = choose_backend(AggregationFacts(None, threads=1, graphs=4))
    assert aggregation == BackendChoice("torch", "aggregation in torch (VLPEFT_BACKEND=torch)", requested="torch")
    monkeypatch.setenv("VLPEFT_BACKEND", " Torch ")  # case and spaces do not matter
    assert choose_backend(AggregationFacts(None, threads=1, graphs=4)).requested == "torch"
    monkeypatch.setenv("VLPEFT_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"VLPEFT_BACKEND='gpu' is not one of \('auto', 'torch', 'cpu', 'triton'\)"):
        choose_backend(AggregationFacts(None, threads=1, graphs=4))


@needs_kernel
def test_cpu_override_skips_the_threads_rule_but_not_the_inputs(monkeypatch):
    monkeypatch.setenv("VLPEFT_BACKEND", "cpu")
    forced = choose_backend(AggregationFacts(None, threads=8, graphs=1))
    assert forced == BackendChoice("cpu", "aggregation by the fused C kernels (VLPEFT_BACKEND=cpu)", requested="cpu")
    declined = choose_backend(AggregationFacts("they take float32 CPU tensors, got float64 on cpu", 1, 4))
    assert declined.name == "torch" and declined.requested == "cpu"
    assert "VLPEFT_BACKEND=cpu asks for the fused C kernels, which do not apply: they take float32" in declined.reason


def test_argument_override_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("VLPEFT_BACKEND", "cpu")
    choice = choose_backend(AggregationFacts(None, threads=1, graphs=4), "torch")
    assert choice == BackendChoice("torch", "aggregation in torch (backend='torch')", requested="torch")
    with pytest.raises(ValueError, match=r"backend='fast' is not one of"):
        choose_backend(AggregationFacts(None, threads=1, graphs=4), "fast")


def test_triton_override_without_triton_is_an_error_naming_what_is_available(monkeypatch):
    monkeypatch.setattr(triton_support, "triton_unavailable_reason", lambda: "Triton is not installed")
    monkeypatch.setenv("VLPEFT_BACKEND", "triton")
    message = r"VLPEFT_BACKEND=triton asks for the fused Triton kernels, but Triton is not installed; available here: torch"
    for facts in (AttentionFacts(fused="Triton is not installed", blocked=None), AggregationFacts(None, 1, 4)):
        with pytest.raises(BackendUnavailableError, match=message):
            choose_backend(facts)
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' asks for the fused Triton kernels"):
        choose_backend(AggregationFacts(None, 1, 4), "triton")
    x = make_features(1, 2, 5, 4, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="VLPEFT_BACKEND=triton"):
        p_laplacian_aggregate(x, x, make_attention(1, 2, 5, 5, dtype=torch.float32), 1.5, 0.2, variant="release",
                              graph="self")


def test_triton_override_falls_back_where_the_kernels_do_not_apply(triton_here):
    attention = choose_backend(AttentionFacts(fused="KV-cached queries (n_q=1, n_k=9)", blocked=None), "triton")
    assert (attention.name, attention.attention, attention.requested) == ("torch", "blocked", "triton")
    assert "backend='triton' asks for the fused Triton kernels, which do not apply: KV-cached queries" in attention.reason
    aggregation = choose_backend(AggregationFacts("they take float32 CPU tensors, got float64 on cpu", 1, 4), "triton")
    assert aggregation.name == "torch"
    assert aggregation.reason.startswith("backend='triton': no Triton kernel computes the aggregation alone; ")


def test_cpu_override_without_a_compiler_is_an_error(monkeypatch, fresh_build):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    message = r"backend='cpu' asks for the fused C kernels, but they cannot be built \(.*/nonexistent/cc.*available here: torch"
    with pytest.warns(RuntimeWarning, match="could not be built"), pytest.raises(BackendUnavailableError, match=message):
        choose_backend(AggregationFacts(None, threads=1, graphs=4), "cpu")


def _count_kernel_calls(monkeypatch):
    calls = []
    for module, name in ((release, "release_aggregate_cpu"), (paper, "paper_forward_block")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def test_p_laplacian_aggregate_takes_the_torch_override(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    x = make_features(2, 2, 7, 4, dtype=torch.float32)
    attn = make_attention(2, 2, 7, 7, causal=True, dtype=torch.float32)
    with recording_backends() as choices:
        for variant, graph in (("release", "self"), ("paper", "bipartite")):
            p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant=variant, graph=graph, backend="torch")
    assert not calls
    assert [choice.reason for choice in choices] == ["aggregation in torch (backend='torch')"] * 2


@needs_kernel
def test_p_laplacian_aggregate_cpu_override_on_float64_falls_back_with_the_reason(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    x = make_features(2, 2, 7, 4)
    attn = make_attention(2, 2, 7, 7, causal=True)
    with recording_backends() as choices:
        got = p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="release", graph="self", backend="cpu")
    assert not calls and [choice.name for choice in choices] == ["torch"]
    assert "which do not apply: they take float32 CPU tensors, got float64 on cpu" in choices[0].reason
    want = p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="release", graph="self")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    p_laplacian_aggregate(x.float(), x.float(), attn.float(), 1.5, 0.2, variant="release", graph="self", backend="cpu")
    assert calls == [1]


def test_recording_collects_the_innermost_block_only():
    facts = AggregationFacts("they take float32 CPU tensors, got float64 on cpu", 1, 4)
    choose_backend(facts)  # nothing open: not recorded, no error
    with recording_backends() as outer:
        choose_backend(facts)
        with recording_backends() as inner:
            choose_backend(facts, "torch")
        choose_backend(facts)
    assert len(outer) == 2 and [choice.requested for choice in inner] == ["torch"]


def test_combined_choice_of_a_module_and_its_log_level(caplog):
    attention = BackendChoice("torch", "blocked eager attention in torch (no fused Triton kernels: x)", "blocked")
    cpu = BackendChoice("cpu", "aggregation by the fused C kernels (float32 CPU tensors, 1 thread(s) for 4 graph(s))")
    combined = combine_choices([attention, cpu, cpu])
    assert combined == BackendChoice("cpu", f"{attention.reason}; {cpu.reason}", "blocked")
    torch_choice = BackendChoice("torch", "aggregation in torch (backend='torch')")
    assert combine_choices([attention, cpu, torch_choice]).name == "cpu+torch"
    fused = BackendChoice("triton", "fused Triton kernels compute the attention and the aggregation (auto)", "fused")
    assert combine_choices([fused]) == fused
    assert combine_choices([]) is None
    with caplog.at_level(logging.INFO, logger="vlpeft.backend"):
        log_choice("model.layers.0.self_attn", combined)
        log_choice("model.layers.1.self_attn", BackendChoice("torch", "r", "eager", requested="triton"))
    assert [(r.name, r.levelno) for r in caplog.records] == [("vlpeft.backend", logging.INFO),
                                                             ("vlpeft.backend", logging.WARNING)]
    assert caplog.records[0].getMessage() == f"model.layers.0.self_attn: {combined}"


def test_available_backends_lists_torch_first():
    found = backend.available_backends()
    assert found[0] == "torch" and set(found) <= {"torch", "cpu", "triton"}
    assert ("cpu" in found) == (cpu_kernels.built_library(False) is not None)
