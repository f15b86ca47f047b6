"""One decoding for users and metrics: `evaluate`'s decoding params drive score's generated replies, chat and
the Ollama Modelfile alike, so the replies that are measured are the ones a user gets (docs/DESIGN.md §5.1)."""

from __future__ import annotations

from typing import Any

import torch


class ReplyRepetitionPenalty:
    """CTRL-style repetition penalty over the tokens of the reply being generated only.

    transformers' `repetition_penalty` also penalises every prompt token, and the end-of-turn token closes the
    system block and every earlier turn of the prompt: the token that ends a reply would be penalised at every
    step, pushing the stop rate down and replies longer, and reusing words of the context (which chrF rewards)
    would be penalised too. Here the prompt is never penalised and the stop tokens never are.
    """

    def __init__(self, penalty: float, prompt_length: int, exempt_ids: list[int]) -> None:
        self.penalty, self.prompt_length = penalty, prompt_length
        self.exempt = torch.tensor(sorted(set(exempt_ids)), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0 or self.penalty == 1.0:
            return scores
        original = torch.gather(scores, 1, generated)
        penalised = torch.where(original < 0, original * self.penalty, original / self.penalty)
        penalised = torch.where(torch.isin(generated, self.exempt.to(generated.device)), original, penalised)
        return scores.scatter(1, generated, penalised)


def decoding(params: Any, prompt_length: int, stop_ids: list[int]) -> dict[str, Any]:
    """`model.generate` keyword arguments from the decoding params (do_sample, temperature, top_p,
    repetition_penalty, max_new_tokens) for prompts `prompt_length` tokens long (left-padded in a batch)."""
    # Every other knob explicitly neutral: transformers fills an unset one from the model's generation_config.json
    # (a hub model's repetition_penalty or top_k) or from its own defaults (top_k 50), which would make the
    # measured decoding differ from the params and from the Ollama Modelfile.
    neutral = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
    sampling = {"temperature": params.temperature, "top_p": params.top_p, **neutral} if params.do_sample else {}
    return {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": params.do_sample,
        **sampling,
        "repetition_penalty": 1.0,  # transformers' own would penalise the prompt: ReplyRepetitionPenalty instead
        "no_repeat_ngram_size": 0,
        "logits_processor": [ReplyRepetitionPenalty(params.repetition_penalty, prompt_length, stop_ids)],
        "eos_token_id": stop_ids,
    }
