"""Teachers: loading diffusers pipelines offline, conditioning, prompts and the prompt-embedding cache."""
