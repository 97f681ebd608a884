"""What the tail needs to draft from its own samples: the head graph beside the tail, and the ids an answer follows.

In output mode "logits" the tail samples every generated token, so it already knows the answer so far (never the
prompt). With the head graph it can run the model a few tokens further on its own: the head over the answer's recent
tokens, after the ids the chat template puts before an answer in place of the prompt, then the tail over that one
position with the conversation's real KV cache. The head's view is approximate (it never saw the prompt), the tail's
is exact. On SmolLM2's greedy chat answers the next token so drafted is the model's own 99% of the time (window 64;
docs/performance.md). The head's weights are the public checkpoint's, which the tail operator has anyway (see the
threat model in docs/privacy.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from export.draft_table import prompt_ids
from splitcore.manifest import GraphSpec, TailDraftSpec

# Sampled tokens the head runs over for each draft. 16 gave 98.2% on SmolLM2's chat answers, 64 gave 99.3%.
WINDOW = 64
_PROBE = "xyzzy"  # a user message whose tokens are easy to find in the rendered template


def write_tail_drafts(tokenizer: PreTrainedTokenizerBase | None, head: GraphSpec, client_dir: Path,
                      server_dir: Path) -> TailDraftSpec:
    """Put the head graph's files in the server bundle too (a hard link where the file system allows)."""
    for name in filter(None, (head.file, head.data_file)):
        target = server_dir / name
        target.unlink(missing_ok=True)
        try:
            os.link(client_dir / name, target)
        except OSError:
            shutil.copyfile(client_dir / name, target)
    return TailDraftSpec(prefix=answer_prefix(tokenizer), window=WINDOW)


def answer_prefix(tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """The ids the chat template writes between a user message and the answer (SmolLM2: ``<|im_end|>\\n
    <|im_start|>assistant\\n``); without a template, the BOS id; without a tokenizer, nothing."""
    if tokenizer is None:
        return []
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    if not getattr(tokenizer, "chat_template", None):
        return bos
    rendered = prompt_ids(tokenizer, _PROBE)
    probe = tokenizer.encode(_PROBE, add_special_tokens=False)
    for start in range(len(rendered) - len(probe), -1, -1):
        if rendered[start : start + len(probe)] == probe:
            return rendered[start + len(probe) :]
    return bos
