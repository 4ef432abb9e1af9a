"""Column names of the pair tables that flow between stages.

A pair table is an Arrow table, one row per preference pair. Tokenized pairs carry the prompt
and the two responses as token ids (the response ids end with EOS when the response ended);
scoring adds log-probs, implicit rewards and the margin; selection adds `kept`. Bootstrapped
pairs have the same columns as offline pairs, with `source = "bootstrap"`.
"""

from __future__ import annotations

import pyarrow as pa

# Provenance.
PAIR_ID = "pair_id"
SOURCE = "source"  # "offline" or "bootstrap"
ITERATION = "iteration"  # 0 for offline data as loaded; t for pairs bootstrapped in iteration t

# Text (kept for inspection and for the run directory).
PROMPT = "prompt"
PROMPT_MESSAGES = "prompt_messages"  # JSON of the prompt's chat messages; null for plain text
CHOSEN = "chosen"
REJECTED = "rejected"

# Tokens.
PROMPT_IDS = "prompt_ids"
CHOSEN_IDS = "chosen_ids"
REJECTED_IDS = "rejected_ids"
TRUNCATED = "truncated"  # the pair was cut to the configured max prompt / total length

# Scores, added by the scorers.
REF_CHOSEN_LOGP = "ref_chosen_logp"
REF_REJECTED_LOGP = "ref_rejected_logp"
POLICY_CHOSEN_LOGP = "policy_chosen_logp"
POLICY_REJECTED_LOGP = "policy_rejected_logp"
PREVIOUS_CHOSEN_LOGP = "previous_chosen_logp"  # the policy of the iteration before (ensemble)
PREVIOUS_REJECTED_LOGP = "previous_rejected_logp"
CHOSEN_LEN = "chosen_len"
REJECTED_LEN = "rejected_len"
CHOSEN_REWARD = "chosen_reward"
REJECTED_REWARD = "rejected_reward"
MARGIN = "margin"

# Selection.
KEPT = "kept"

SOURCE_OFFLINE = "offline"
SOURCE_BOOTSTRAP = "bootstrap"

TOKENIZED_FIELDS = [
    pa.field(PAIR_ID, pa.string()),
    pa.field(SOURCE, pa.string()),
    pa.field(ITERATION, pa.int32()),
    pa.field(PROMPT, pa.string()),
    pa.field(CHOSEN, pa.string()),
    pa.field(REJECTED, pa.string()),
    pa.field(PROMPT_IDS, pa.list_(pa.int32())),
    pa.field(CHOSEN_IDS, pa.list_(pa.int32())),
    pa.field(REJECTED_IDS, pa.list_(pa.int32())),
    pa.field(TRUNCATED, pa.bool_()),
]
TOKENIZED_SCHEMA = pa.schema(TOKENIZED_FIELDS)

# What a learner needs of a pair: tokens and the reference log-probs computed while scoring.
TRAIN_COLUMNS = [PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS, REF_CHOSEN_LOGP, REF_REJECTED_LOGP]
