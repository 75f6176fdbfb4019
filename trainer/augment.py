"""``reward augment``: synthetic comparisons for what judged data takes for granted.

Judged preference data (AlpacaEval's GPT-4 comparisons, HH, TruthfulQA) compares two real
attempts at an answer. It almost never shows the judge an answer that refuses a harmless request
or answers a different question, so a reward model trained on it alone has no reason to rank
"No." below a real answer, and often does not (issue 18's "tell me a joke" example). Each kind
here pairs a real better answer from the source with a made-up worse one:

* ``dismissive``: a non-answer ("No.", "I don't know.", "Figure it out yourself.", or a longer
  polite brush-off) drawn from :data:`DISMISSIVE_REPLIES`;
* ``off_topic``: the better answer of another prompt of the same source: fluent, well formed,
  and about something else;
* ``longer_off_topic``: as ``off_topic``, but always an answer longer than the better one. The
  brush-offs of ``dismissive`` are nearly all shorter than the answer they lose to, so a file of
  those alone tilt toward "the shorter answer loses"; ``dismissive,longer_off_topic`` puts the
  longer answer on the losing side of about half the pairs, so the file itself has no length
  tilt (what a model then learns is measured in docs/default-model.md, "Fresh obvious pairs");
* ``related_answer``: the better answer of one of the most similar other prompts (TF-IDF over the
  prompts' words): on the same topic, often sharing its words, but answering another question.
  Off-topic answers can be told apart by their topic alone; these only by whether they answer
  what was asked, as a padded answer that talks about the subject without doing the task does not.
  Their lengths are those of the source's own answers, so the file has little length tilt;
* ``non_answer``: a non-committal reply ("I have no comment.", "I don't know.") against an
  informative best answer. TruthfulQA counts such replies as truthful but not informative, and
  scores a model on answers that are both;
* ``hedged_false``: the record's own worst answer behind or before a hedge ("I'm not sure.
  Fortune cookies originated in China."): hedging does not make a false claim true, yet data
  whose best answers are often cautious teaches a model that hedges score well.

Use ``dismissive`` and ``off_topic`` on sources whose prompts are benign requests (AlpacaEval's
instructions, for ``objective=helpfulness``), ``non_answer`` and ``hedged_false`` on sources
whose worse answers are false (TruthfulQA, for ``objective=truthfulness``); none of them on
harmlessness data, where declining is often the right answer.
Records keep their prompt; the written file is the ``rankings`` format (``category`` names the
kind), which ``reward train-rm --data`` reads like any other source.
"""

from __future__ import annotations

import argparse
import bisect
import random
import sys
from pathlib import Path
from typing import Sequence

from .data import DataError, PreferenceRecord, load_preferences, write_rankings_jsonl

KINDS = ("dismissive", "off_topic", "longer_off_topic", "related_answer", "non_answer", "hedged_false")

# Non-answers: refusals of a harmless request, shrugs, brush-offs. None carries content.
DISMISSIVE_REPLIES = (
    "No.",
    "I don't know.",
    "I'm not going to do that.",
    "I can't help with that.",
    "Figure it out yourself.",
    "Maybe.",
    "Not sure.",
    "Ask someone else.",
    "Whatever.",
    "That's not something I want to answer.",
    "I have no idea.",
    "Sorry, no.",
    "Look it up.",
    "I'd rather not.",
    "Why would I tell you that?",
    "Nope.",
    "It depends.",
    "Can't say.",
    # longer brush-offs, so that "shorter loses" is not all these pairs teach
    "I'm sorry, but I'm not able to help with that request. You might try searching online or asking someone "
    "who knows more about the topic.",
    "That is an interesting question, and there are many things one could say about it. In the end it really "
    "depends on a lot of factors, so I'd rather not give a specific answer here.",
    "I don't think I should answer this one. There are plenty of other resources out there that could help "
    "you with it better than I can.",
)

# Replies that commit to nothing: worse than a true and informative answer, not false.
NON_ANSWERS = (
    "I have no comment.",
    "No comment.",
    "I don't know.",
    "I'm not sure.",
    "I can't say.",
    "I have no idea.",
    "That's hard to say.",
    "I'd rather not guess.",
)

# Hedges put before (ending a sentence, so the claim keeps its own capital) or after a false claim.
HEDGES_BEFORE = (
    "I'm not sure.",
    "I don't know.",
    "I might be wrong, but here is my guess:",
    "Hard to say for certain.",
    "I'm not an expert on this, but:",
    "I could be mistaken.",
)
HEDGES_AFTER = (
    "But I'm not sure.",
    "I think, though I could be wrong.",
    "At least, that's my understanding.",
    "Don't quote me on that.",
)

# A best answer that itself commits to nothing is no better than a non-answer: left out of non_answer.
NON_COMMITTAL_OPENINGS = ("i have no comment", "no comment", "i don't know", "i do not know", "nobody knows",
                          "no one knows", "it is not known", "there is no way to know", "i'm not sure", "i am not sure")

# A better answer this short is left out: against a brush-off it may not be clearly better.
MIN_ANSWER_WORDS = 3

# related_answer draws from a prompt's few nearest neighbours (variety), never from one so close it
# may be a paraphrase whose answer also answers this prompt, nor from one so far that its answer is
# simply off topic (TF-IDF cosine; on AlpacaEval's instructions 40% of prompts have a neighbour at 0.2+).
RELATED_TOP_K = 3
RELATED_MIN_SIMILARITY = 0.2
RELATED_MAX_SIMILARITY = 0.8


def is_non_committal(answer: str) -> bool:
    return answer.strip().lower().replace("\u2019", "'").startswith(NON_COMMITTAL_OPENINGS)


def hedged(claim: str, rng: random.Random) -> str:
    claim = claim.strip()
    if not claim.endswith((".", "!", "?")):
        claim += "."
    if rng.random() < 0.5:
        return f"{rng.choice(HEDGES_BEFORE)} {claim}"
    return f"{claim} {rng.choice(HEDGES_AFTER)}"


def _longer_answer_elsewhere(record: PreferenceRecord, by_length: Sequence[PreferenceRecord], rng: random.Random,
                             tries: int = 20) -> str | None:
    """The best answer of a random record under another prompt whose best answer is longer than
    ``record``'s (``by_length``: the records sorted by that length); None if none is found."""
    start = bisect.bisect_right(by_length, len(record.best), key=lambda r: len(r.best))
    if start == len(by_length):
        return None
    for _ in range(tries):
        other = by_length[rng.randrange(start, len(by_length))]
        if other.prompt != record.prompt:
            return other.best
    return None


def _prompt_text(record: PreferenceRecord) -> str:
    return "\n".join(str(m.get("content", "")) for m in record.prompt)


def _related_prompts(usable: Sequence[PreferenceRecord]) -> dict[str, list[list[int]]]:
    """For each distinct prompt text, the records (indices into ``usable``) under each of its
    :data:`RELATED_TOP_K` most similar other prompts by TF-IDF cosine, between
    :data:`RELATED_MIN_SIMILARITY` and :data:`RELATED_MAX_SIMILARITY` (a near-paraphrase's answer
    may answer this prompt too); a prompt with none is left out."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    by_text: dict[str, list[int]] = {}
    for i, record in enumerate(usable):
        by_text.setdefault(_prompt_text(record), []).append(i)
    texts = list(by_text)
    if len(texts) < 2:
        return {}
    vectors = TfidfVectorizer(stop_words="english", sublinear_tf=True).fit_transform(texts)
    # brute-force cosine over the sparse vectors, computed in memory-bounded chunks by scikit-learn
    k = min(len(texts), RELATED_TOP_K + 1 + 4)  # a few spare for itself, paraphrases and duplicates
    distances, neighbours = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(vectors).kneighbors(vectors)
    related: dict[str, list[list[int]]] = {}
    for row, text in enumerate(texts):
        picks = [by_text[texts[j]] for d, j in zip(distances[row], neighbours[row])
                 if j != row and RELATED_MIN_SIMILARITY <= 1.0 - d < RELATED_MAX_SIMILARITY][:RELATED_TOP_K]
        if picks:
            related[text] = picks
    return related


class AugmentError(ValueError):
    """The request cannot be met (no usable records, an unknown kind); the message says what to change."""


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"kinds are {', '.join(KINDS)} (comma-separated), not {text!r}")
    return kinds


def synthetic_records(records: Sequence[PreferenceRecord], kinds: Sequence[str], n: int, seed: int = 0) -> list[PreferenceRecord]:
    """``n`` pairs, the kinds taking turns: each a distinct source record's best answer (ranked
    first) against a made-up worse one of that kind, under the record's own prompt."""
    for kind in kinds:
        if kind not in KINDS:
            raise AugmentError(f"unknown kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if n < 1:
        raise AugmentError("ask for at least one pair (--n)")
    usable = [r for r in records if len(r.best.split()) >= MIN_ANSWER_WORDS]
    if len(usable) < 2:
        raise AugmentError(f"the source has {len(usable)} records whose best answer has {MIN_ANSWER_WORDS}+ words; need 2 or more")
    if "non_answer" in kinds and all(is_non_committal(r.best) for r in usable):
        raise AugmentError("non_answer needs best answers that commit to something; every one here is itself a non-answer")
    if {"off_topic", "longer_off_topic", "related_answer"} & set(kinds) and all(r.prompt == usable[0].prompt for r in usable):
        raise AugmentError("off_topic, longer_off_topic and related_answer need records under at least two different "
                           "prompts; the source has one")
    by_length = sorted(usable, key=lambda r: len(r.best)) if "longer_off_topic" in kinds else []
    related = _related_prompts(usable) if "related_answer" in kinds else {}
    rng = random.Random(seed)
    order = list(range(len(usable)))
    rng.shuffle(order)
    out: list[PreferenceRecord] = []
    drawn = 0
    while len(out) < n:  # a record no pair of the kind can be made from is skipped: draw the next one
        if drawn >= 10 * len(order) + n:
            raise AugmentError(f"only {len(out)} of {n} pairs could be made: too few records suit {kinds[len(out) % len(kinds)]}")
        record = usable[order[drawn % len(order)]]
        drawn += 1
        best = record.best
        kind = kinds[len(out) % len(kinds)]
        if kind == "non_answer" and is_non_committal(best):
            continue
        if kind == "dismissive":
            worse = rng.choice(DISMISSIVE_REPLIES)
        elif kind == "non_answer":
            worse = rng.choice(NON_ANSWERS)
        elif kind == "hedged_false":
            worse = hedged(record.worst, rng)
        elif kind == "longer_off_topic":
            worse = _longer_answer_elsewhere(record, by_length, rng)
            if worse is None:  # among the longest answers: nothing longer to lose to
                continue
        elif kind == "related_answer":
            neighbours = related.get(_prompt_text(record))
            if not neighbours:  # no other prompt is near enough, or only paraphrases are
                continue
            worse = usable[rng.choice(rng.choice(neighbours))].best
        else:
            while True:  # another prompt's best answer (prompts can repeat in a source: compare them)
                other = usable[rng.randrange(len(usable))]
                if other.prompt != record.prompt:
                    break
            worse = other.best
        if worse.strip() == best.strip():  # the same text (another prompt's same answer): no comparison, and a malformed row
            continue
        out.append(PreferenceRecord(prompt=[dict(m) for m in record.prompt], responses=[best, worse], ranking=[0, 1],
                                    category=kind, source=f"augment:{kind}", line=len(out) + 1))
    return out


def add_augment_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "augment", help="write synthetic comparisons (dismissive, off-topic, non-committal or hedged false answers) from a source's prompts",
        description=__doc__.split("\n\n")[0].replace("``", "'"),
    )
    parser.add_argument("--data", required=True, metavar="PATH[:WEIGHT][:MAX_ROWS]",
                        help="the source whose prompts and best answers are used (any format train-rm reads)")
    parser.add_argument("--kinds", type=parse_kinds, default=["dismissive", "off_topic"], metavar="K[,K]",
                        help=f"which kinds of worse answer, taking turns, of {','.join(KINDS)} (default: dismissive,off_topic, "
                        "for benign requests, or dismissive,longer_off_topic to keep length from deciding, or related_answer for "
                        "answers on the topic that answer another question; "
                        "non_answer,hedged_false for sources whose worse answers are false)")
    parser.add_argument("--n", type=int, required=True, help="how many pairs to write")
    parser.add_argument("--seed", type=int, default=0, help="which records and which replies (default 0)")
    parser.add_argument("--out", required=True, type=Path, help="the rankings JSONL to write")
    parser.set_defaults(func=run_augment)


def run_augment(args: argparse.Namespace) -> int:
    try:
        records = load_preferences([args.data], seed=args.seed).records
        pairs = synthetic_records(records, args.kinds, args.n, args.seed)
    except (DataError, AugmentError) as exc:
        print(f"reward augment: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_rankings_jsonl(pairs, args.out)
    counts = {kind: sum(p.category == kind for p in pairs) for kind in args.kinds}
    print(f"reward augment: {len(pairs)} pairs from {len(records)} records of {args.data} "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())}) -> {args.out}")
    return 0
