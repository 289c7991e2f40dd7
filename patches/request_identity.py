"""Tell KVQ which request each batch row is, for the exact recent window.

vLLM's ``CommonAttentionMetadata`` carries no request identity (its ``req_idx`` field is not
filled by the model runner), but the window needs it: a request keeps one ring slot for as
long as it runs. This wraps ``GPUModelRunner._build_attention_metadata`` (the CPU runner
inherits it) to pass ``input_batch.req_ids`` -- final row order, after the decode/prefill
reorder -- to the ``publish_batch`` callback just before the metadata builders run. Real
steps pass ``num_scheduled_tokens``; dummy and profiling batches do not, and are published
as None so they never touch a window. It also wraps
``GPUModelRunner._update_states(scheduler_output)`` to hand the requests that finished or
were preempted (``finished_req_ids``, ``preempted_req_ids``) to the ``release_requests``
callback, which frees their window slots. Both callbacks are given to ``apply``.
"""

import inspect
from collections.abc import Callable, Iterable

from . import VLLMChangedError, check_parameters, require_parameters, wrap

_NEEDED = ("self", "num_tokens", "num_reqs", "max_query_len", "num_scheduled_tokens")

# Read by the wrappers on every call, so a later apply() swaps them without wrapping again.
_publish_batch: Callable[[list[str] | None], None] | None = None
_release_requests: Callable[[Iterable[str]], None] | None = None


def _target():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def check() -> None:
    from vllm.v1.core.sched.output import SchedulerOutput

    missing = [f for f in ("finished_req_ids", "preempted_req_ids")
               if f not in SchedulerOutput.__dataclass_fields__]
    if missing:
        raise VLLMChangedError(f"SchedulerOutput lost fields {missing}; "
                               "patches/request_identity.py must be updated.")
    check_parameters(_target()._update_states, ["self", "scheduler_output"], __name__,
                     "GPUModelRunner._update_states")
    require_parameters(_target()._build_attention_metadata, _NEEDED, __name__,
                       "GPUModelRunner._build_attention_metadata")
    from vllm.v1.worker.gpu_input_batch import InputBatch

    if not isinstance(getattr(InputBatch, "req_ids", None), property):
        raise VLLMChangedError("InputBatch.req_ids is no longer a property; "
                               "patches/request_identity.py must be updated.")


def apply(publish_batch: Callable[[list[str] | None], None],
          release_requests: Callable[[Iterable[str]], None]) -> None:
    """``publish_batch(req_ids)``: the request id of every row, or None for a dummy or
    profiling batch. ``release_requests(req_ids)``: requests that finished or were
    preempted."""
    global _publish_batch, _release_requests
    _publish_batch, _release_requests = publish_batch, release_requests
    cls = _target()
    wrap(cls, "_update_states", _releasing)
    wrap(cls, "_build_attention_metadata", _publishing)


def _publishing(original):
    # The arguments are bound by name: vLLM passes some positionally, some by keyword.
    signature = inspect.signature(original)

    def _build_attention_metadata(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        real = bound.arguments.get("num_scheduled_tokens") is not None
        num_reqs = bound.arguments["num_reqs"]
        _publish_batch(list(self.input_batch.req_ids[:num_reqs]) if real else None)
        return original(self, *args, **kwargs)

    return _build_attention_metadata


def _releasing(original):
    def _update_states(self, scheduler_output):
        _release_requests(scheduler_output.finished_req_ids)
        _release_requests(scheduler_output.preempted_req_ids or ())
        return original(self, scheduler_output)

    return _update_states
