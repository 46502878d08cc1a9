"""Post-training: from a pretrained run to an assistant (chat template, SFT, DPO, LoRA).

    chat.py      the chat template for any tokenizer, chat tokens added to a base run, one chat turn
    data.py      conversation and preference JSONL readers, the built-in task from the plays
    lora.py      low-rank adapters on the projections, merged into the weights on save
    sft.py       supervised fine-tuning, loss on assistant tokens only
    dpo.py       direct preference optimisation against a cached frozen reference
"""
