"""What every local backend does with a request before any model work: check it, lay out its
prompt within the context, and make its `Sequence`; and the `ModelInfo` it shows front ends.
Shared by the continuous-batching `Engine` and the per-call backend (ZeroGPU), so both refuse
the same requests with the same messages."""
from __future__ import annotations

from dataclasses import replace

from ..chat.formats import chat_format_for
from ..chat.planning import PromptPlan, plan_messages
from ..protocol import ChatRequest, InvalidRequest, ModelInfo
from .decode_batch import Sequence, new_sequence


def prepare(tokenizer, model, request: ChatRequest, context_length: int) -> tuple[Sequence, PromptPlan]:
    """The request's sequence (its answer bounded by context_length too) and prompt plan; raises
    InvalidRequest, at once, for bad sampling parameters or a conversation that cannot fit."""
    request.sampling.validate()
    sampling = replace(request.sampling, max_length=min(request.sampling.max_length, context_length))
    plan = plan_messages(tokenizer, request.messages, sampling.max_length, request.tools, request.tool_choice)
    try:
        seq = new_sequence(model, plan.tokens, sampling, stop_ids=plan.stop_ids, cache_salt=request.cache_salt)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    return seq, plan


def model_info(tokenizer, model, *, name: str, context_length: int, random_weights: bool) -> ModelInfo:
    chat_format = chat_format_for(tokenizer)
    return ModelInfo(name=name, max_sequence_length=context_length, random_weights=random_weights,
                     supports_system_prompt=chat_format.supports_system_prompt,
                     supports_tools=chat_format.tool_dialect is not None,
                     default_sampling=chat_format.default_sampling, fine_tunes=model.fine_tunes,
                     reasoning=chat_format.opens_thinking)
