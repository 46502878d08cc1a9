"""Post-training: from a pretrained run to an assistant (chat template, SFT, DPO, LoRA). See docs/posttraining.md.

    chat.py      the chat template for any tokenizer, chat tokens added to a base run, one chat turn
    data.py      conversation and preference JSONL readers, the built-in task from the plays, batches
    loop.py      PostTrainConfig and the loop SFT and DPO share: start, steps, checkpoints, exact resume
    sft.py       supervised fine-tuning, loss on assistant tokens normalised over the accumulated batch
    dpo.py       direct preference optimisation against a cached frozen reference
    lora.py      low-rank adapters on the projections, merged into the weights on save
    evaluate.py  exact match of greedy answers on the built-in task
"""
