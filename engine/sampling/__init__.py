"""From logits to tokens: sampling params, the sampler, the vLLM/OpenAI sampling knobs,
logits processors, prompt log-probs, scoring and beam search."""
