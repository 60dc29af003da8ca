"""Training: from traces to weights, and from weights to the served policy.

`learner` encodes conversations (assistant-only labels), batches them, computes per-token
log-probs and holds the LoRA learner, SFT and the checked optimizer step; `losses` holds the
objectives as small pure functions (SCoRe's, SPIN's) with the behaviour log-probs and
importance weights of stale rollouts; `distributed` shards and sums across torchrun ranks;
`publish` saves an update, loads it on every replica and verifies it (canary);
`rollout_thread` drives the served policy on one thread so rollouts overlap training.

May import: the core modules and `data`. Not the agent (policies, loop), evaluation,
serving or the commands (tests/test_layers.py): the policies import `learner` to score
text and `publish` to load adapters on every replica, not the other way round."""
