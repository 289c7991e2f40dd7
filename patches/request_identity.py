"""Tell KVQ which request each batch row is, for the exact recent window.

vLLM's ``CommonAttentionMetadata`` carries no request identity (its ``req_idx`` field is not
filled by the model runner), but the window needs it: a request keeps one ring slot for as
long as it runs. This wraps ``GPUModelRunner._build_attention_metadata`` (the CPU runner
inherits it) to publish ``input_batch.req_ids`` -- final row order, after the decode/prefill
reorder -- just before the metadata builders run. Real steps pass ``num_scheduled_tokens``;
dummy and profiling batches do not, and are published as None so they never touch a window.
It also wraps ``GPUModelRunner._update_states(scheduler_output)`` to hand back the window
slots of requests that finished or were preempted (``finished_req_ids``,
``preempted_req_ids``).
"""

import inspect

from . import VLLMChangedError

_MARK = "_kvq_patched"
_NEEDED = ("self", "num_tokens", "num_reqs", "max_query_len", "num_scheduled_tokens")


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
    fn = _target()._update_states
    params = list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)
    if params != ["self", "scheduler_output"]:
        raise VLLMChangedError(f"GPUModelRunner._update_states changed its parameters to "
                               f"{params}; patches/request_identity.py must be updated.")
    fn = _target()._build_attention_metadata
    params = list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)
    missing = [p for p in _NEEDED if p not in params]
    if missing:
        raise VLLMChangedError(f"GPUModelRunner._build_attention_metadata lost parameters "
                               f"{missing}; patches/request_identity.py must be updated.")
    from vllm.v1.worker.gpu_input_batch import InputBatch

    if not isinstance(getattr(InputBatch, "req_ids", None), property):
        raise VLLMChangedError("InputBatch.req_ids is no longer a property; "
                               "patches/request_identity.py must be updated.")


def apply() -> None:
    cls = _target()
    _wrap_update_states(cls)
    original = cls._build_attention_metadata
    if getattr(original, _MARK, False):
        return

    signature = inspect.signature(original)

    def _build_attention_metadata(self, *args, **kwargs):
        from vllm_kvq.window import publish_batch

        bound = signature.bind(self, *args, **kwargs)
        real = bound.arguments.get("num_scheduled_tokens") is not None
        num_reqs = bound.arguments["num_reqs"]
        publish_batch(list(self.input_batch.req_ids[:num_reqs]) if real else None)
        return original(self, *args, **kwargs)

    _build_attention_metadata.__wrapped__ = original
    setattr(_build_attention_metadata, _MARK, True)
    cls._build_attention_metadata = _build_attention_metadata


def _wrap_update_states(cls) -> None:
    original = cls._update_states
    if getattr(original, _MARK, False):
        return

    def _update_states(self, scheduler_output):
        from vllm_kvq.window import release_requests

        release_requests(scheduler_output.finished_req_ids)
        release_requests(scheduler_output.preempted_req_ids or ())
        return original(self, scheduler_output)

    _update_states.__wrapped__ = original
    setattr(_update_states, _MARK, True)
    cls._update_states = _update_states
