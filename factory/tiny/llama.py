"""A tiny random-weight Llama chat model: a BPE tokenizer trained offline on a small built-in
corpus, wrapped in `PreTrainedTokenizerFast` with a Llama-2-style chat template, and a 2-layer
`LlamaForCausalLM`, both saved with `save_pretrained` so `AutoTokenizer` /
`AutoModelForCausalLM.from_pretrained(path)` load them like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Llama-2-chat's prompt format: [INST] <<SYS>> system <</SYS>> user [/INST] answer </s>
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_text = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system_text = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token }}[INST] "
    "{% if loop.first and system_text %}<<SYS>>\n{{ system_text }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] | trim }} [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

CORPUS = """\
A photo of a dog on the beach at sunset, in watercolor style.
Generate an image of the cat wearing a red hat in the snow.
Can you generate a picture of my dog as an astronaut on the moon?
I want something creative for this dog, can you help me?
Show me this person as a knight in a medieval castle, oil painting.
Make the teddy bear sit in a forest with autumn leaves.
Could you draw my backpack on a mountain top under the stars?
The assistant explains the image: the subject keeps its identity while the scene changes.
Here is the dog in comic book style, with bold lines and bright colors.
I placed the cat in a cozy kitchen with warm light, as you asked.
Sure! I imagined the person as a painter in Paris, holding a brush by the river.
You write short, friendly conversations between a user and an image assistant.
Reply with one JSON object with the keys user and assistant, and nothing else.
{"user": "Can you put my dog on the beach?", "assistant": "Here is your dog on a sunny beach."}
{"user": "Draw this cat as a pirate.", "assistant": "I drew the cat as a pirate on a ship."}
{"user": "I want something fun.", "assistant": "I guessed you would like a party, so the bear wears a hat."}
["red", "green", "blue"], {"a": 1, "b": [2, 3]}, "quote: \\"yes\\"", 0 1 2 3 4 5 6 7 8 9
Subject: dog. Domain: object. Instruction: a dog in the style of Van Gogh. Style: question.
Subject: person. Domain: human. Instruction: a person as a chef in a kitchen. Style: command.
Subject: vase. Domain: object. Instruction: a vase in cubism style. Style: ambiguous.
"""


def build_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (every string round-trips) with Llama-2 special tokens."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=LLAMA2_CHAT_TEMPLATE,
    )


def build_tiny_llama(path: str | Path, hidden_size: int = 48, seed: int = 0) -> str:
    """Save a tiny random LlamaForCausalLM and its tokenizer under `path`; return the path."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
