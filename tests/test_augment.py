"""`reward augment`: a user turns a source's prompts and best answers into synthetic comparisons
(the best answer against a dismissive non-answer, or against another prompt's answer) and trains
on the file like any other source."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server import REPO_ROOT
from trainer.augment import DISMISSIVE_REPLIES, HEDGES_AFTER, HEDGES_BEFORE, NON_ANSWERS, AugmentError, synthetic_records
from trainer.data import PreferenceRecord, load_preferences


def source(n: int = 6) -> list[PreferenceRecord]:
    return [
        PreferenceRecord([{"role": "user", "content": f"Question {i}?"}],
                         [f"A weaker answer to question {i}.", f"The best answer to question {i}, in full."], [1, 0])
        for i in range(n)
    ]


def test_each_pair_keeps_its_prompt_and_ranks_the_best_answer_above_a_made_up_worse_one():
    records = source()
    pairs = synthetic_records(records, ["dismissive", "off_topic"], n=6, seed=3)
    assert [p.category for p in pairs] == ["dismissive", "off_topic"] * 3  # the kinds take turns
    assert len({p.prompt[0]["content"] for p in pairs}) == 6  # distinct source records while they last
    for pair in pairs:
        i = pair.prompt[0]["content"].split()[1].rstrip("?")
        assert pair.ranking == [0, 1] and pair.responses[0] == f"The best answer to question {i}, in full."
        if pair.category == "dismissive":
            assert pair.responses[1] in DISMISSIVE_REPLIES
        else:  # another question's best answer, never this one's
            assert pair.responses[1].startswith("The best answer to question ") and f"question {i}," not in pair.responses[1]


def test_longer_off_topic_answers_balance_the_brush_offs_so_length_cannot_decide():
    # The user's worry: brush-offs are short, so pairs of them alone teach "the shorter answer loses".
    records = [
        PreferenceRecord([{"role": "user", "content": f"Question {i}?"}],
                         ["Weak.", f"Answer {i} " + "in detail " * i], [1, 0])
        for i in range(1, 30)
    ]
    pairs = synthetic_records(records, ["dismissive", "longer_off_topic"], n=40, seed=1)
    off_topic = [p for p in pairs if p.category == "longer_off_topic"]
    assert len(off_topic) == 20
    for pair in off_topic:  # always a longer answer, always to another question
        best, worse = pair.responses
        assert len(worse) > len(best) and worse.split()[1] != best.split()[1]
    longer_wins = sum(len(p.responses[0]) > len(p.responses[1]) for p in pairs) / len(pairs)
    assert 0.4 <= longer_wins <= 0.6
    # The longest answer has nothing longer to lose to: it is never given this kind.
    assert all(p.responses[0] != records[-1].best for p in off_topic)


def test_related_answers_come_from_a_similar_prompt_never_an_unrelated_one_or_a_paraphrase():
    # The user's worry: an answer about something else is easy to rank by topic alone; a padded answer
    # on the subject that does not do the task needs pairs whose worse answer is on the subject too.
    def record(prompt: str, answer: str) -> PreferenceRecord:
        return PreferenceRecord([{"role": "user", "content": prompt}], [answer, "Meh, whatever."], [0, 1])
    records = [
        record("How do I check my Python version?", "Run python --version in a terminal."),
        record("How do I install a package for Python?", "Use pip install followed by the package name."),
        record("What is the capital of Norway?", "Oslo is the capital of Norway."),
        record("What's the capital of Norway?", "The capital of Norway is Oslo, on its southern coast."),  # a paraphrase
        record("Name a good sourdough bread recipe.", "Mix flour, water, salt and starter; prove overnight; bake hot."),
        record("How long should sourdough bread prove?", "Prove it 8 to 12 hours in the fridge, or 4 to 6 at room temperature."),
    ]
    pairs = synthetic_records(records, ["related_answer"], n=12, seed=0)
    assert len(pairs) == 12 and {p.category for p in pairs} == {"related_answer"}
    partner = {"How do I check my Python version?": "Use pip install followed by the package name.",
               "How do I install a package for Python?": "Run python --version in a terminal.",
               "Name a good sourdough bread recipe.": "Prove it 8 to 12 hours in the fridge, or 4 to 6 at room temperature.",
               "How long should sourdough bread prove?": "Mix flour, water, salt and starter; prove overnight; bake hot."}
    for pair in pairs:  # the Norway questions are each other's paraphrase and share no word with the rest
        assert pair.responses[1] == partner[pair.prompt[0]["content"]]
    with pytest.raises(AugmentError, match="too few records suit related_answer"):
        synthetic_records(records[2:4], ["related_answer"], n=2)


def test_a_truthfulness_source_gives_its_answers_above_non_answers_and_hedged_false_claims():
    false_claims = {f"Question {i}?": f"A weaker answer to question {i}." for i in range(6)}
    cautious = PreferenceRecord([{"role": "user", "content": "Unknowable?"}], ["I have no comment", "It is certainly 42."], [0, 1])
    pairs = synthetic_records(source() + [cautious], ["non_answer", "hedged_false"], n=40, seed=5)
    assert {p.category for p in pairs} == {"non_answer", "hedged_false"} and len(pairs) == 40
    for pair in pairs:
        best, worse = pair.responses
        question = pair.prompt[0]["content"]
        if pair.category == "non_answer":
            # a best answer that itself commits to nothing is never paired with a non-answer
            assert worse in NON_ANSWERS and question != "Unknowable?"
        else:  # the record's own worse answer, hedged before or after, never softened into another claim
            claim = false_claims.get(question, "It is certainly 42.")
            assert any(worse == f"{h} {claim}" for h in HEDGES_BEFORE) or any(worse == f"{claim} {h}" for h in HEDGES_AFTER)
    # TruthfulQA's own best answer is sometimes "I have no comment": still better than a hedged false claim.
    hedged_only = synthetic_records([cautious, *source(1)], ["hedged_false"], n=2, seed=0)
    assert {p.prompt[0]["content"] for p in hedged_only} == {"Unknowable?", "Question 0?"}
    only_cautious = [cautious, PreferenceRecord([{"role": "user", "content": "Future?"}], ["Nobody knows for sure.", "Yes."], [0, 1])]
    with pytest.raises(AugmentError, match="commit to something"):
        synthetic_records(only_cautious, ["non_answer"], n=2)


def test_the_same_seed_gives_the_same_pairs_and_another_seed_other_ones():
    a = synthetic_records(source(20), ["dismissive", "off_topic"], n=10, seed=1)
    b = synthetic_records(source(20), ["dismissive", "off_topic"], n=10, seed=1)
    c = synthetic_records(source(20), ["dismissive", "off_topic"], n=10, seed=2)
    assert [p.to_row() for p in a] == [p.to_row() for p in b] != [p.to_row() for p in c]


def test_another_prompts_answer_of_the_very_same_text_is_never_made_a_pair():
    # Sources repeat answers across prompts ("I have no comment." in TruthfulQA, boilerplate in
    # AlpacaEval): such a pair compares a text with itself, which train-rm refuses as malformed.
    same = "The same full answer to both of them."
    records = [PreferenceRecord([{"role": "user", "content": f"Question {i}?"}], [same, "Meh."], [0, 1]) for i in range(2)]
    records.append(PreferenceRecord([{"role": "user", "content": "Question 2?"}], ["Another answer in full.", "Meh."], [0, 1]))
    pairs = synthetic_records(records, ["off_topic"], n=6, seed=0)
    assert len(pairs) == 6 and all(p.responses[0].strip() != p.responses[1].strip() for p in pairs)


def test_best_answers_too_short_to_beat_a_brush_off_are_left_out():
    records = source(3) + [PreferenceRecord([{"role": "user", "content": "Yes or no?"}], ["Yes.", "No."], [0, 1])]
    pairs = synthetic_records(records, ["dismissive"], n=30, seed=0)
    assert all(p.prompt[0]["content"] != "Yes or no?" for p in pairs)


def test_impossible_requests_say_what_to_change():
    with pytest.raises(AugmentError, match="unknown kind 'typo'"):
        synthetic_records(source(), ["typo"], n=2)
    with pytest.raises(AugmentError, match="need 2 or more"):
        synthetic_records(source(1), ["off_topic"], n=2)
    with pytest.raises(AugmentError, match="at least one pair"):
        synthetic_records(source(), ["dismissive"], n=0)
    same_prompt = [PreferenceRecord([{"role": "user", "content": "One question?"}], [f"A full answer number {i}.", "Meh."], [0, 1])
                   for i in range(3)]
    with pytest.raises(AugmentError, match="two different prompts"):  # rather than search for another prompt forever
        synthetic_records(same_prompt, ["off_topic"], n=2)
    equal_lengths = [PreferenceRecord([{"role": "user", "content": f"Question {i}?"}], [f"Answer number {i}.", "Meh."], [0, 1])
                     for i in range(3)]
    with pytest.raises(AugmentError, match="too few records suit longer_off_topic"):  # none has a longer one to lose to
        synthetic_records(equal_lengths, ["longer_off_topic"], n=2)


def test_the_command_writes_a_file_train_rm_reads_as_a_source(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Explain topic {i}.", "chosen": f"Topic {i} is explained here at length.",
                                       "rejected": f"Topic {i}?"}) + "\n" for i in range(8)))
    out = tmp_path / "aug.jsonl"
    done = subprocess.run([sys.executable, "-m", "reward_cli", "augment", "--data", str(src), "--n", "4", "--seed", "7",
                           "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 pairs from 8 records" in done.stdout and "dismissive 2, off_topic 2" in done.stdout
    loaded = load_preferences([f"{out}:1:objective=helpfulness"]).records
    assert len(loaded) == 4 and {r.category for r in loaded} == {"dismissive", "off_topic"}
    assert all(r.responses[r.ranking[0]].startswith("Topic ") and r.responses[r.ranking[0]].endswith("at length.") for r in loaded)

    bad = subprocess.run([sys.executable, "-m", "reward_cli", "augment", "--data", str(tmp_path / "missing.jsonl"), "--n", "4",
                          "--out", str(tmp_path / "x.jsonl")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr and not (tmp_path / "x.jsonl").exists()
