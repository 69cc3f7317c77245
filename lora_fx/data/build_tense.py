"""Build ``tense.jsonl``, the demo's classification set: is a sentence about the past, the present or the future?

Sentence embedding models such as all-MiniLM-L6-v2 map sentences by topic and barely by tense, so
the bundled model does not solve this zero-shot; a LoRA adapter learns it in a few hundred steps.
The sentences are assembled by this script from the word lists below (written for lora_fx), so the
set is deterministic and free of third-party text. Licence: CC0 1.0.

Test sentences use verbs that never occur in training, so accuracy measures tense, not memorised verbs.
Run ``python -m lora_fx.data.build_tense`` to rebuild the file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    ("I", "am"), ("She", "is"), ("He", "is"), ("We", "are"), ("They", "are"), ("My brother", "is"),
    ("The teacher", "is"), ("Our neighbours", "are"), ("The old fisherman", "is"), ("The children", "are"),
    ("A young doctor", "is"), ("The committee", "is"), ("My grandmother", "is"), ("The students", "are"),
    ("Your cousin", "is"), ("The pilot", "is"), ("Two engineers", "are"), ("The mayor", "is"),
    ("Everyone in the village", "is"), ("The band", "is"), ("My parents", "are"), ("The new intern", "is"),
    ("A tired nurse", "is"), ("The farmers", "are"), ("Our team", "is"), ("The chef", "is"),
]

# (past, present participle, base form, rest of the sentence)
VERBS = [
    ("walked", "walking", "walk", "to the market"), ("cooked", "cooking", "cook", "dinner for the family"),
    ("painted", "painting", "paint", "the kitchen walls"), ("wrote", "writing", "write", "a long letter"),
    ("read", "reading", "read", "the morning paper"), ("visited", "visiting", "visit", "the museum"),
    ("fixed", "fixing", "fix", "the broken bicycle"), ("planted", "planting", "plant", "tomatoes in the garden"),
    ("cleaned", "cleaning", "clean", "the whole apartment"), ("built", "building", "build", "a wooden shed"),
    ("sang", "singing", "sing", "at the concert"), ("studied", "studying", "study", "for the exam"),
    ("drove", "driving", "drive", "to the coast"), ("bought", "buying", "buy", "a new coat"),
    ("played", "playing", "play", "chess in the park"), ("watched", "watching", "watch", "the football match"),
    ("baked", "baking", "bake", "bread for the neighbours"), ("climbed", "climbing", "climb", "the steep hill"),
    ("washed", "washing", "wash", "the car"), ("answered", "answering", "answer", "the emails"),
    ("repaired", "repairing", "repair", "the leaking roof"), ("opened", "opening", "open", "a small bakery"),
    ("sold", "selling", "sell", "the old piano"), ("taught", "teaching", "teach", "a maths class"),
    ("called", "calling", "call", "the insurance company"), ("ran", "running", "run", "along the river"),
    ("swam", "swimming", "swim", "across the lake"), ("packed", "packing", "pack", "the suitcases"),
    ("moved", "moving", "move", "to a bigger house"), ("finished", "finishing", "finish", "the report"),
    ("organised", "organising", "organise", "a birthday party"), ("delivered", "delivering", "deliver", "the parcels"),
    ("designed", "designing", "design", "a new bridge"), ("fed", "feeding", "feed", "the ducks"),
    ("carried", "carrying", "carry", "the heavy boxes"), ("drew", "drawing", "draw", "a map of the town"),
    ("caught", "catching", "catch", "the early train"), ("rode", "riding", "ride", "a horse on the beach"),
    ("sent", "sending", "send", "the invitations"), ("planned", "planning", "plan", "the summer trip"),
    ("recorded", "recording", "record", "a new song"), ("tested", "testing", "test", "the software"),
    ("collected", "collecting", "collect", "the rent"), ("decorated", "decorating", "decorate", "the hall"),
    ("measured", "measuring", "measure", "the garden fence"),
    # held out for the test split
    ("translated", "translating", "translate", "the contract"), ("borrowed", "borrowing", "borrow", "a ladder"),
    ("launched", "launching", "launch", "the rocket"), ("knitted", "knitting", "knit", "a warm scarf"),
    ("photographed", "photographing", "photograph", "the wedding"), ("interviewed", "interviewing", "interview", "the candidates"),
    ("sailed", "sailing", "sail", "around the island"), ("harvested", "harvesting", "harvest", "the apples"),
    ("rehearsed", "rehearsing", "rehearse", "the play"), ("inspected", "inspecting", "inspect", "the factory"),
    ("polished", "polishing", "polish", "the silver"), ("explored", "exploring", "explore", "the cave"),
    ("celebrated", "celebrating", "celebrate", "the victory"), ("printed", "printing", "print", "the posters"),
    ("hiked", "hiking", "hike", "through the forest"),
]
N_TRAIN_VERBS = 45
LABELS = ["past", "present", "future"]


def sentence(subject: tuple[str, str], verb: tuple[str, str, str, str], label: str) -> str:
    who, be = subject
    past, ing, base, rest = verb
    if label == "past":
        return f"{who} {past} {rest}."
    if label == "present":
        return f"{who} {be} {ing} {rest}."
    return f"{who} will {base} {rest}."


def build(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, verb in enumerate(VERBS):
        split = "train" if i < N_TRAIN_VERBS else "test"
        for label in LABELS:
            for subject in rng.sample(SUBJECTS, 5 if split == "train" else 4):
                rows.append({"text": sentence(subject, verb, label), "label": LABELS.index(label), "split": split})
    rng.shuffle(rows)
    return rows


def main() -> None:
    path = Path(__file__).with_name("tense.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in build()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
