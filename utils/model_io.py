"""Old name of :mod:`utils.model_calls`, the home for calling a user's model; kept so
``from utils.model_calls import get_logits`` keeps working."""

from utils.model_calls import (  # noqa: F401
    CONTEXT_SEARCH,
    DEFAULT_CONTEXT,
    TARGET_NAMES,
    InputSpec,
    ModelCall,
    call_with_targets,
    check_context,
    find_context_length,
    find_hidden_size,
    find_input_embedding,
    find_num_layers,
    find_vocab_size,
    get_attentions,
    get_logits,
    get_loss,
    input_spec,
    model_call,
    model_device,
    model_loss,
    predict,
    preserved_state,
    short_logits_error,
    unwrap,
)
