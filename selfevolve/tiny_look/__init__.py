"""`tiny-look`: the bundled sibling of `tiny`, pretrained to take a second look (weights only).

The same architecture and size as `tiny`, with its own byte-level tokenizer trained on its
corpus (361 tokens, `tiny`'s 353). The corpus answers first turns directly and
teaches second turns to re-derive step by step (docs/experiments.md, "A second look that
re-derives"). Made by:

    selfevolve run recipe=pretrain seed=0 threads=1 p_direct=1 p_steps_prompt=0.35 p_two_turn=0.5 \
        p_draft_wrong=0.5 p_fix=0.6 p_recheck=0.3 "difficulties=[1,2,3,4]" run_dir=runs/pretrain-look2
"""
