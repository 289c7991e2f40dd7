"""A transformers causal LM's decoder blocks as block-wise calibration sees them: the first
block's inputs on the calibration windows, and one block applied to a hidden state.

Every decoder block of a Llama-style model takes the same keyword arguments (rotary
position embeddings, mask, positions) for a given window, so they are recorded once, at the
first block, and reused for every block.
"""

import torch


class _Stop(Exception):
    """Ends a forward pass once the first decoder block's inputs are recorded."""


@torch.no_grad()
def block_inputs(model, windows: list[list[int]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Per window: the first decoder block's hidden-state input ``[1, T, hidden]`` and the
    other keyword arguments every block is called with."""
    inputs: list[tuple] = []

    def keep(_module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    hook = model.model.layers[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        for ids in windows:
            try:
                model(torch.tensor([ids]), use_cache=False)
            except _Stop:
                pass
    finally:
        hook.remove()
    hidden = [args[0] if args else kwargs["hidden_states"] for args, kwargs in inputs]
    kwargs = [{k: v for k, v in kw.items() if k != "hidden_states"} for _, kw in inputs]
    return hidden, kwargs


def run_block(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block's output hidden state."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
