"""Model code, apart from orchestration: generators, scorers' backbones, LLM engines."""
