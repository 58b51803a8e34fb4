"""Which backend computes a p-Laplacian block, and why: the one place where that is decided.

:func:`choose_backend` makes both decisions of an adapted attention block, from facts its callers found:

- the attention path of one attention call (:class:`AttentionFacts`, found by :mod:`vlpeft.glue.attention_paths`):
  ``fused`` (backend "triton": the fused Triton kernels compute the attention and the ``release`` aggregation
  together, :mod:`~vlpeft.functional.p_laplacian.triton_attention`), ``blocked`` (vlpeft's blocked eager attention
  in torch, which skips the masked causal staircase, :mod:`vlpeft.functional.blocked_attention`) or ``eager`` (the
  model's own eager attention, or an inline attention module's own computation);
- the kernel of one p-Laplacian aggregation (:class:`AggregationFacts`, found by the variants): "cpu" (the fused C
  kernels, :mod:`~vlpeft.functional.p_laplacian.cpu_kernels`) or "torch".

It returns a :class:`BackendChoice` (name, reason). Override, first found wins: the ``backend`` argument /
``PAdapterConfig.backend`` unless "auto", the environment variable ``VLPEFT_BACKEND`` (auto | torch | cpu | triton).
``torch`` keeps both fused kernels off; ``cpu`` uses the C kernels for every call they can compute (also past the
threads-per-graph rule); ``triton`` uses the fused Triton kernels for every call they can compute. A backend that
cannot run on this machine at all (triton without Triton or CUDA, cpu when the C kernels cannot be built) is a
:class:`BackendUnavailableError` naming the value and what is available; a call the requested backend cannot compute
(e.g. a KV-cached decoding step under triton, float64 under cpu) falls back to the auto rule and its reason says so.
The deprecated ``VLPEFT_CPU_KERNEL=0`` (see :data:`~vlpeft.functional.p_laplacian.cpu_kernels.ENV_SWITCH`) keeps the
C kernels off under "auto".

Every choice is also appended to the lists opened by :func:`recording_backends` in this thread (the p-adapter layer
uses that to keep and log, once per module, what ran: :func:`combine_choices`, :func:`log_choice`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vlpeft.functional.p_laplacian import cpu_kernels, triton_support

BACKENDS: tuple[str, ...] = ("torch", "cpu", "triton")
BACKEND_OVERRIDES: tuple[str, ...] = ("auto", *BACKENDS)
ATTENTION_PATHS: tuple[str, ...] = ("fused", "blocked", "eager")
ENV_BACKEND = "VLPEFT_BACKEND"
LOGGER = logging.getLogger("vlpeft.backend")


class BackendUnavailableError(RuntimeError):
    """A backend override names a backend that cannot run on this machine."""


@dataclass(frozen=True)
class BackendChoice:
    """What computes a p-Laplacian block, and why.

    Attributes:
        name: "triton" (fused attention + aggregation kernels), "cpu" (fused C kernels of the aggregation) or
            "torch". For an attention call that is not fused: "torch" (the attention runs in torch; its aggregation
            is chosen when it runs). For an adapted module: the backend of its aggregation ("a+b" if its adapters
            differ).
        reason: why, in words (the facts that decided it).
        attention: "fused", "blocked" or "eager" for attention calls and adapted modules; None for a bare
            aggregation (``p_laplacian_aggregate``).
        requested: the override in force ("auto", or the backend it asked for).
    """

    name: str
    reason: str
    attention: str | None = None
    requested: str = "auto"

    def __str__(self) -> str:
        where = self.name if self.attention is None else f"{self.name} (attention: {self.attention})"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class AttentionFacts:
    """Facts about one attention call of an adapted block: why each path cannot compute it, or None when it can.

    Attributes:
        fused: the fused Triton kernels (attention + ``release`` aggregation), e.g. "Triton is not installed" or
            "KV-cached queries (n_q=1, n_k=9)".
        blocked: vlpeft's blocked eager attention, e.g. "one row block (nothing to skip)".
    """

    fused: str | None
    blocked: str | None


@dataclass(frozen=True)
class AggregationFacts:
    """Facts about one p-Laplacian aggregation call.

    Attributes:
        cpu_kernel: why the fused C kernels cannot compute it (dtype or device, ``compiled``, recomputed
            attention), or None when they can.
        threads: torch's intra-op threads.
        graphs: independent graphs of the call (batch x heads, or batch for a head-mean graph).
    """

    cpu_kernel: str | None
    threads: int
    graphs: int


def check_override(value: object, name: str = "backend") -> None:
    """``value`` must be one of :data:`BACKEND_OVERRIDES` (``name`` is how the error names it)."""
    if value not in BACKEND_OVERRIDES:
        raise ValueError(f"{name}={value!r} is not one of {BACKEND_OVERRIDES}")


def resolve_override(requested: str | None = "auto") -> tuple[str, str]:
    """(override in force, where it comes from): ``requested`` unless "auto"/None, else ``VLPEFT_BACKEND``."""
    if requested is not None and requested != "auto":
        check_override(requested)
        return requested, f"backend={requested!r}"
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if value in ("", "auto"):
        return "auto", "auto"
    check_override(value, ENV_BACKEND)
    return value, f"{ENV_BACKEND}={value}"


def available_backends() -> tuple[str, ...]:
    """The backends that can run on this machine (builds the C kernels if that was not tried yet)."""
    found = ["torch"]
    if cpu_kernels.built_library(False) is not None:
        found.append("cpu")
    if triton_support.triton_unavailable_reason() is None:
        found.append("triton")
    return tuple(found)


def require_backend(requested: str, source: str | None = None) -> None:
    """Raise :class:`BackendUnavailableError` if the override ``requested`` cannot run on this machine at all."""
    source = source or f"backend={requested!r}"
    if requested == "triton":
        missing = triton_support.triton_unavailable_reason()
        if missing is not None:
            raise BackendUnavailableError(f"{source} asks for the fused Triton kernels, but {missing}; available "
                                          f"here: {', '.join(available_backends())}")
    elif requested == "cpu":
        try:
            cpu_kernels.built_library(True)
        except cpu_kernels.CpuKernelBuildError as error:
            raise BackendUnavailableError(f"{source} asks for the fused C kernels, but they cannot be built "
                                          f"({error}); available here: {', '.join(available_backends())}") from error


def choose_backend(facts: AttentionFacts | AggregationFacts, override: str | None = "auto") -> BackendChoice:
    """The backend of one attention call or one aggregation call, with the reason (see the module docstring).

    Args:
        facts: :class:`AttentionFacts` (attention path: fused / blocked / eager) or :class:`AggregationFacts`
            (aggregation kernel: cpu / torch).
        override: "auto" (then ``VLPEFT_BACKEND`` applies), "torch", "cpu" or "triton".

    Raises:
        BackendUnavailableError: the override names a backend that cannot run on this machine.
        ValueError: an unknown override value (argument or environment).
    """
    requested, source = resolve_override(override)
    if requested != "auto":
        require_backend(requested, source)
    if isinstance(facts, AttentionFacts):
        choice = _attention_choice(facts, requested, source)
    else:
        choice = _aggregation_choice(facts, requested, source)
    records = getattr(_records, "stack", None)
    if records:
        records[-1].append(choice)
    return choice


def _attention_choice(facts: AttentionFacts, requested: str, source: str) -> BackendChoice:
    if requested in ("auto", "triton") and facts.fused is None:
        return BackendChoice("triton", f"fused Triton kernels compute the attention and the aggregation ({source})",
                             "fused", requested)
    if requested in ("torch", "cpu"):
        not_fused = f"fused Triton kernels off by {source}"
    elif requested == "triton":
        not_fused = f"{source} asks for the fused Triton kernels, which do not apply: {facts.fused}"
    else:
        not_fused = f"no fused Triton kernels: {facts.fused}"
    if facts.blocked is None:
        return BackendChoice("torch", f"blocked eager attention in torch ({not_fused})", "blocked", requested)
    return BackendChoice("torch", f"the model's own eager attention (no blocked attention: {facts.blocked}; "
                         f"{not_fused})", "eager", requested)


def _aggregation_choice(facts: AggregationFacts, requested: str, source: str) -> BackendChoice:
    if requested == "torch":
        return BackendChoice("torch", f"aggregation in torch ({source})", requested=requested)
    if requested == "cpu":
        if facts.cpu_kernel is not None:
            return BackendChoice("torch", f"aggregation in torch ({source} asks for the fused C kernels, which do "
                                 f"not apply: {facts.cpu_kernel})", requested=requested)
        return BackendChoice("cpu", f"aggregation by the fused C kernels ({source})", requested=requested)
    prefix = "" if requested == "auto" else f"{source}: no Triton kernel computes the aggregation alone; "
    if facts.cpu_kernel is not None:
        why = f"the fused C kernels do not apply: {facts.cpu_kernel}"
    elif facts.threads > cpu_kernels.THREADS_PER_GRAPH * max(1, facts.graphs):
        why = (f"{facts.threads} torch threads for {facts.graphs} graph(s): the C kernels run one thread per graph, "
               f"torch's ops use every thread")
    elif (switch := cpu_kernels.switch()) == "0":
        why = f"{cpu_kernels.ENV_SWITCH}=0 (deprecated: use {ENV_BACKEND}=torch)"
    elif cpu_kernels.built_library(switch == "1") is None:
        why = "the fused C kernels could not be built"
    else:
        return BackendChoice("cpu", f"{prefix}aggregation by the fused C kernels (float32 CPU tensors, "
                             f"{facts.threads} thread(s) for {facts.graphs} graph(s))", requested=requested)
    return BackendChoice("torch", f"{prefix}aggregation in torch ({why})", requested=requested)


# ------------------------------------------------------------------------------------------ what ran


_records = threading.local()


@contextlib.contextmanager
def recording_backends() -> Iterator[list[BackendChoice]]:
    """Within the block, every :func:`choose_backend` call of this thread appends its choice to the yielded list
    (the innermost open block only)."""
    stack = _records.__dict__.setdefault("stack", [])
    record: list[BackendChoice] = []
    stack.append(record)
    try:
        yield record
    finally:
        stack.pop()


def combine_choices(choices: Sequence[BackendChoice]) -> BackendChoice | None:
    """One module's choices of one call (its attention call, then its adapters' aggregations) as one choice: the
    attention path of the first attention choice, the aggregations' backend names (joined by "+" if they differ),
    the reasons joined by "; ". None for no choices."""
    if not choices:
        return None
    attention = next((choice for choice in choices if choice.attention is not None), None)
    aggregations = [choice for choice in choices if choice.attention is None]
    names = list(dict.fromkeys(choice.name for choice in aggregations)) or [choices[0].name]
    reasons = list(dict.fromkeys(choice.reason for choice in choices))
    return BackendChoice("+".join(names), "; ".join(reasons), None if attention is None else attention.attention,
                         choices[0].requested)


def log_choice(owner: str, choice: BackendChoice) -> None:
    """Log ``choice`` for ``owner`` (a module name) on the ``vlpeft.backend`` logger: a warning when an override asked
    for another backend than the one that ran, else info."""
    honoured = choice.requested in ("auto", choice.name)
    LOGGER.log(logging.INFO if honoured else logging.WARNING, "%s: %s", owner, choice)
