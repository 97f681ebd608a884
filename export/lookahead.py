"""Fit the tail's look-ahead (splitcore/lookahead.py) on the model's own answers, the draft table's samples.

For each position t of an answer: the features are the final logits at t over the shortlist (the K tokens the
answers use most), and the token sampled there, t + 1, as its LM-head row's logits over the shortlist (zero, with a
flag, when it is off the shortlist); the target is the logits at t + 1 over the shortlist. Ridge regression in
float64 maps one to the other. The logits come from the final hidden states and the LM-head rows of the shortlist,
never over the whole vocabulary.

How often a guess of each confidence (the softmax peak over the shortlist) is right is measured on the model's
greedy answers to other requests (export/draft_table.py CALIBRATION_REQUESTS): on SmolLM2 a guess is right for 28%
of the positions of sampled answers it was not fitted on, but for 19% of greedy chat answers, and a chat client
mostly decodes greedily or near it. Those chances are what the client weighs a guess by.

Chosen on SmolLM2 (16,384 sampled tokens; the agreement is with the model's greedy token-after-next on 10 chat
answers it was not fitted on): a shortlist of 1,024 tokens agrees 21.0%, its whole vocabulary as the target 21.6%
(a file 50x the size); ridge 1e-5 of the features' mean square 21.0%, 1e-4 20.7%, 1e-3 19.4%. The sampled
token's part through a 64-number code of its embedding instead of its row: 17.7%.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.draft_table import Answer
from export.graph_builder import IR_VERSION, OPSET
from splitcore.lookahead import CONFIDENCE, GUESS, LOGITS, SAMPLED
from splitcore.manifest import LookaheadSpec

log = logging.getLogger(__name__)

LOOKAHEAD_FILE = "lookahead.onnx"  # in the server bundle
SHORTLIST = 1024
RIDGE = 1e-5  # times the mean of the features' squares over the fitted positions
CONFIDENCE_BINS = 8
MIN_TOKENS = 16  # fewer distinct answer tokens than this: nothing worth a guess


def write_lookahead(model: torch.nn.Module, answers: Sequence[Answer], calibration: Sequence[Answer],
                    server_dir: Path, progress: Callable[[str], None] = lambda message: None) -> LookaheadSpec | None:
    """Fit the look-ahead on ``answers``, measure its chances on ``calibration``, and write it to
    ``server_dir``/lookahead.onnx; None when the answers are too few to fit one."""
    counts = Counter(t for answer in answers for t in answer.tokens)
    if len(counts) < MIN_TOKENS:
        log.warning("  no look-ahead: the sampled answers use %d distinct tokens", len(counts))
        return None
    shortlist = np.array(sorted(counts, key=lambda t: (-counts[t], t))[:SHORTLIST], dtype=np.int64)
    head = model.lm_head
    rows = head.weight.detach()[torch.from_numpy(shortlist)].to(torch.float64)  # [K, hidden]
    bias = getattr(head, "bias", None)
    row_bias = bias.detach()[torch.from_numpy(shortlist)].to(torch.float64) if bias is not None else None
    fitted, calibrating = Positions(len(shortlist)), Positions(len(shortlist), keep=True)
    answers, calibration = list(answers), list(calibration)
    token_part = (rows @ rows.T).numpy()  # a shortlist token's LM-head row, as logits over the shortlist
    row_of = {int(t): i for i, t in enumerate(shortlist)}
    everything = answers + calibration
    done = 0
    for group in _same_prompt(answers) + _same_prompt(calibration):
        for answer, logits in zip(group, _shortlist_logits(model, group, rows, row_bias)):
            (fitted if done < len(answers) else calibrating).add(logits, answer.tokens, token_part, row_of, shortlist)
            done += 1
        progress(f"features of answer {done}/{len(everything)}")
    if not fitted.count or not calibrating.count:
        log.warning("  no look-ahead: too few answer positions (%d)", fitted.count + calibrating.count)
        return None
    weights = fitted.solve()
    edges, chances, agreement = _chances(weights, calibrating, shortlist)
    k = len(shortlist)
    # The sampled token's part, per shortlist token (its LM-head row's logits through the map), then off the list.
    from_token = np.concatenate([token_part @ weights[k : 2 * k], weights[2 * k : 2 * k + 1]])
    graph = build_graph(shortlist, weights[:k], from_token, weights[2 * k + 1], model.config.vocab_size)
    onnx.save(graph, server_dir / LOOKAHEAD_FILE)
    log.info("  look-ahead over %d tokens, fitted on %d positions: right for %.1f%% of %d positions of greedy answers "
             "to other requests", k, fitted.count, 100 * agreement, calibrating.count)
    return LookaheadSpec(file=LOOKAHEAD_FILE, shortlist=k, positions=fitted.count,
                         greedy_agreement=round(agreement, 4), confidence_edges=edges.tolist(),
                         chances=chances.tolist())


def build_graph(shortlist: np.ndarray, from_logits: np.ndarray, from_token: np.ndarray, bias: np.ndarray,
                vocab: int) -> onnx.ModelProto:
    """The look-ahead as a graph: logits [rows, vocab] and sampled [rows] -> guess [rows] (a vocabulary id) and
    confidence [rows] (the softmax peak over the shortlist).

    scores = logits[:, shortlist] @ from_logits + from_token[row of sampled] + bias, where a sampled token's row is
    its place on the shortlist, or K (the last row of ``from_token``) off it."""
    k = len(shortlist)
    rows = np.full(vocab, k, dtype=np.int64)
    rows[shortlist] = np.arange(k)
    initializers = [
        numpy_helper.from_array(np.asarray(shortlist, np.int64), "shortlist"),
        numpy_helper.from_array(np.asarray(from_logits, np.float32), "from_logits"),
        numpy_helper.from_array(np.asarray(from_token, np.float32), "from_token"),
        numpy_helper.from_array(np.asarray(bias, np.float32), "bias"),
        numpy_helper.from_array(rows, "rows"),
    ]
    nodes = [
        helper.make_node("Gather", [LOGITS, "shortlist"], ["shortlist_logits"], axis=1),
        helper.make_node("MatMul", ["shortlist_logits", "from_logits"], ["mapped"]),
        helper.make_node("Gather", ["rows", SAMPLED], ["sampled_rows"], axis=0),
        helper.make_node("Gather", ["from_token", "sampled_rows"], ["token_part"], axis=0),
        helper.make_node("Add", ["mapped", "token_part"], ["unbiased"]),
        helper.make_node("Add", ["unbiased", "bias"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["best"], axis=1, keepdims=0),
        helper.make_node("Gather", ["shortlist", "best"], [GUESS], axis=0),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        helper.make_node("ReduceMax", ["probabilities"], [CONFIDENCE], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "lookahead",
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["rows", vocab]),
         helper.make_tensor_value_info(SAMPLED, TensorProto.INT64, ["rows"])],
        [helper.make_tensor_value_info(GUESS, TensorProto.INT64, ["rows"]),
         helper.make_tensor_value_info(CONFIDENCE, TensorProto.FLOAT, ["rows"])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="splitllm",
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _same_prompt(answers: Sequence[Answer], most: int = 16) -> list[list[Answer]]:
    """Runs of consecutive answers to the same prompt (as sample_answers writes them), at most ``most`` each."""
    groups: list[list[Answer]] = []
    for answer in answers:
        if groups and groups[-1][0].prompt == answer.prompt and len(groups[-1]) < most:
            groups[-1].append(answer)
        else:
            groups.append([answer])
    return groups


def _shortlist_logits(model: torch.nn.Module, group: Sequence[Answer], rows: torch.Tensor,
                      row_bias: torch.Tensor | None) -> list[np.ndarray]:
    """For answers to one prompt, in one run: the final logits over the shortlist at the prompt's last position and
    every answer position, [1 + n, K] each. The shorter answers are padded at the end, which a causal model's
    earlier positions never see."""
    prompt = group[0].prompt
    longest = max(len(answer.tokens) for answer in group)
    ids = torch.tensor([prompt + answer.tokens + [0] * (longest - len(answer.tokens)) for answer in group],
                       dtype=torch.long)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[:, len(prompt) - 1 :].to(torch.float64)
    logits = hidden @ rows.T
    logits = logits if row_bias is None else logits + row_bias
    return [logits[i, : len(answer.tokens) + 1].numpy() for i, answer in enumerate(group)]


class Positions:
    """The normal equations of the ridge fit, accumulated answer by answer (and the features themselves, ``keep``)."""

    def __init__(self, k: int, keep: bool = False) -> None:
        self.k = k
        width = 2 * k + 2  # logits over the shortlist, the sampled token's part, off-shortlist flag, 1
        self.gram = np.zeros((width, width))
        self.cross = np.zeros((width, k))
        self.count = 0
        self.keep = keep
        self.features: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []  # the token after the sampled one

    def add(self, logits: np.ndarray, tokens: list[int], token_part: np.ndarray, row_of: dict[int, int],
            shortlist: np.ndarray) -> None:
        # Position j of ``logits`` sampled tokens[j]; its target is position j + 1's logits, its answer tokens[j + 1].
        n = len(tokens) - 1
        if n < 1:
            return
        x = np.zeros((n, 2 * self.k + 2))
        x[:, : self.k] = logits[:n]
        for j in range(n):
            row = row_of.get(tokens[j])
            if row is None:
                x[j, 2 * self.k] = 1.0
            else:
                x[j, self.k : 2 * self.k] = token_part[row]
        x[:, -1] = 1.0
        y = logits[1 : n + 1]
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.count += n
        if self.keep:
            self.features.append(x)
            self.targets.append(np.array(tokens[1 : n + 1]))

    def solve(self) -> np.ndarray:
        ridge = RIDGE * float(np.mean(np.diag(self.gram)))
        return np.linalg.solve(self.gram + ridge * np.eye(len(self.gram)), self.cross)


def _chances(weights: np.ndarray, calibrating: Positions, shortlist: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, float]:
    """Confidence bins (quantiles of the calibration guesses' softmax peaks) and how often each bin's guesses were
    right, with one right and one wrong guess assumed so that no bin claims 0 or 1; and the overall agreement."""
    x, target = np.concatenate(calibrating.features), np.concatenate(calibrating.targets)
    scores = x @ weights
    best = scores.argmax(axis=1)
    peak = scores[np.arange(len(best)), best]
    confidence = 1.0 / np.exp(scores - peak[:, None]).sum(axis=1)
    right = shortlist[best] == target
    inner = np.unique(np.quantile(confidence, np.linspace(0, 1, CONFIDENCE_BINS + 1)[1:-1]))
    edges = np.concatenate([[0.0], inner[(inner > 0) & (inner < 1)], [1.0 + 1e-9]])
    bins = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, len(edges) - 2)
    seen = np.bincount(bins, minlength=len(edges) - 1)
    kept = np.bincount(bins, weights=right, minlength=len(edges) - 1)
    return edges, (kept + 1) / (seen + 2), float(right.mean())
