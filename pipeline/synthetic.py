"""Synthetic instruction-following suite: the offline, laptop-sized stand-in for Dolly.

The default pipeline trains a tiny GPT-2 teacher and a tinier student from scratch on a CPU in
minutes, so it cannot use Dolly or OpenWebText. This module writes Dolly-format records
(`instruction`, `context`, `response`, `category`, plus `references`) and pre-training prose about
one small, fixed, fictional world. Everything is pure Python and driven by `random.Random`
instances only, so the same arguments give the same data on every machine and Python run.

The world
---------
Fixed for every seed (built once from `_WORLD_SEED`), so the pre-training corpus and every suite
describe the same facts:

- 8 countries (Valdor, Mirenia, ...), each with a capital and a flag colour;
- 32 towns, 4 per country, each famous for one food (every food has 4 towns);
- 40 people, 5 per country, each with a job, an age (20-69), a home town, a pet and a favourite
  colour (every job has 4 people; every pet and colour has 5);
- 20 animals that can fly, swim, climb, dig or run; 8 colours; 8 foods.

Jobs, pets, colours and foods are spread evenly on purpose: "name one person who works as a
baker" then always has several right answers, which is the multi-modal structure that makes
forward KL (mode covering) and reverse KL (mode seeking) distillation behave differently.
The vocabulary stays at a few hundred words so that a 1-2k byte-level BPE covers it.

Task families (the `category` field)
------------------------------------
With a single right answer:

- `arithmetic`: plus, minus (never negative) or times of small numbers; the answer is the number.
- `sorting`: 3-5 distinct lowercase nouns to sort alphabetically; answer "a, b, c".
- `classification`: is a word an animal, a colour or a food; is a name a person, a town or a
  country.
- `counting` (context: a comma-separated word list): how many words, or how often one word occurs.
- `closed_qa` (context: a passage about 2 people): a fact question; the answer is the span copied
  from the passage.
- `extraction` (context: a passage about 2-3 people): list every person's job (or age, home town,
  pet, colour) in order of appearance.

With several right answers (`references` lists them; `response` is one drawn at random, so SFT
sees the whole distribution):

- `open_qa`: a world fact, answered by any of its paraphrases ("The capital of Valdor is X." /
  "X is the capital of Valdor.").
- `describe`: "Write a sentence about X": any true fact about X, in any paraphrase (up to 10).
- `name_one`: "Name one town in Valdor" / "... animal that can fly": any member (4-5 of them).
- `list_three`: "List three people who have a cat": every 3-subset of the members, each in
  alphabetical order (4 or 10 references).
- `summarization` (context: a passage of 4-6 sentences about one person): any of three one-sentence
  summary templates.

Prompts are short (instructions up to ~20 words, contexts up to ~50) and responses 1-20 words.

Evaluation sets, the analogues of the paper's five
--------------------------------------------------
- `dollyeval` (DollyEval, the held-out Dolly test split): the same families and instruction
  phrasings as train, on items whose prompts train never sees.
- `selfinst` (SelfInst, user-oriented instructions written by other people): the train families
  asked with phrasings held out of train. Every family keeps its last phrasing out of train, and
  those are written as a user would ("I am visiting X. What food should I try there?").
- `vicunaeval` (VicunaEval, harder open-ended questions): longer or compositional variants of every
  family: two facts at once, sums of three numbers, 6-8 words to sort, 10-16 words to count,
  passages about 4 people, "name two" / "list four", two-sentence descriptions and summaries.
  Its responses run to ~30 words and its passages to ~45, past the limits of the other sets.
- `sni` (S-NI, which keeps only gold responses of >= 11 words): the context families whose answers
  can be long (extraction and summarization) on passages that neither train nor valid ever
  contain, keeping only gold responses of >= 8 words. 8 plays the paper's 11: our responses are
  1-20 words, and 8 keeps every summary and most extractions while dropping short ones such as
  "Bo is 64 and Fenn is 54." (closed_qa and counting answers are single words, so the filter would
  drop them all.)
- `unni` (UnNI, a differently-sourced set under the same length filter): open_qa, describe,
  extraction and summarization about the held-out country Quorath, its towns and its people.
  No train, valid or other evaluation record names any of them, so the facts come only from the
  pre-training corpus; gold responses of >= 5 words are kept (the filter applied to our short
  answers; it drops answers like "Kai is 63.").

Guarantees: train, valid and the five evaluation sets never share a prompt (instruction + context),
and each set is exactly the requested size. Each set is drawn by picking a family at random and
redrawing a record until its prompt is new; a family that fails `_MAX_TRIES_PER_RECORD` times in a
row is taken as exhausted, and a set whose families are all exhausted raises ValueError.
Small families (open_qa, describe, name_one, list_three) hold a few hundred distinct prompts, so a
very large train set leans towards the others.
"""

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import EVAL_SETS  # noqa: F401  (the suite builds one split per evaluation set)

_WORLD_SEED = 20230615
_MAX_TRIES_PER_RECORD = 200
_SNI_MIN_RESPONSE_WORDS = 8
_UNNI_MIN_RESPONSE_WORDS = 5
_HELD_OUT_COUNTRY = "Quorath"

_COUNTRY_TOWNS: dict[str, tuple[str, ...]] = {
    "Valdor": ("Brenn", "Lumford", "Dask", "Orrin"),
    "Mirenia": ("Tolk", "Sarve", "Penwick", "Ardel"),
    "Kestria": ("Hollin", "Gresk", "Maro", "Tivel"),
    "Osland": ("Nure", "Bastow", "Corrin", "Felk"),
    "Brevia": ("Ostra", "Quell", "Dunmere", "Raskel"),
    "Tamoria": ("Yarrow", "Pell", "Sunmoor", "Kade"),
    "Zelwyn": ("Irvel", "Mossly", "Thane", "Wend"),
    "Quorath": ("Ulm", "Carrow", "Festa", "Lorn"),
}
_PEOPLE_PER_COUNTRY = 5
_PEOPLE_NAMES: tuple[str, ...] = (
    "Ana", "Bo", "Cyra", "Dario", "Elin", "Fenn", "Gala", "Hugo", "Ida", "Jory",
    "Kira", "Lev", "Mara", "Nils", "Odile", "Pia", "Quin", "Rosa", "Sven", "Tova",
    "Ulla", "Vito", "Wren", "Xan", "Yara", "Zeno", "Abel", "Bina", "Cato", "Della",
    "Emil", "Faye", "Gus", "Hana", "Ivo", "Juno", "Kai", "Ilsa", "Milo", "Nora",
)
_JOBS = ("baker", "farmer", "teacher", "doctor", "painter", "fisher", "miller", "smith", "singer", "tailor")
_PETS = ("cat", "dog", "parrot", "rabbit", "fish", "frog", "horse", "goat")
_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "purple", "orange")
_FOODS = ("bread", "cheese", "soup", "rice", "honey", "plums", "beans", "pie")
_ANIMAL_ABILITIES: dict[str, tuple[str, ...]] = {
    "fly": ("owl", "duck", "parrot", "bat", "eagle"),
    "swim": ("duck", "fish", "frog", "seal", "otter"),
    "climb": ("cat", "goat", "squirrel", "bear"),
    "dig": ("dog", "mole", "rabbit", "fox"),
    "run": ("horse", "dog", "fox", "deer"),
}
_ANIMALS = tuple(sorted({animal for animals in _ANIMAL_ABILITIES.values() for animal in animals}))
_NOUNS = _ANIMALS + _COLOURS + _FOODS + _JOBS
# (label, label with its article, plural, members): the word groups of classification and of the corpus.
_NOUN_GROUPS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("animal", "an animal", "animals", _ANIMALS),
    ("colour", "a colour", "colours", _COLOURS),
    ("food", "a food", "foods", _FOODS),
)


@dataclass(frozen=True)
class _Entity:
    kind: str  # "country", "town" or "person"
    name: str
    facts: dict[str, str]  # relation name -> value, e.g. {"capital": "Brenn", "flag": "red"}


@dataclass(frozen=True)
class _Relation:
    name: str
    subject_kind: str
    questions: tuple[str, ...]  # the LAST phrasing is held out of train for selfinst
    answers: tuple[str, ...]  # paraphrases of the same answer; all of them are references


_RELATIONS: tuple[_Relation, ...] = (
    _Relation(
        "capital", "country",
        ("What is the capital of {s}?", "Which town is the capital of {s}?", "Name the capital of {s}.",
         "I am planning a trip to {s}. Which town is its capital?"),
        ("The capital of {s} is {v}.", "{v} is the capital of {s}."),
    ),
    _Relation(
        "flag", "country",
        ("What colour is the flag of {s}?", "What is the colour of the flag of {s}?",
         "Which colour does the flag of {s} have?", "I want to draw the flag of {s}. What colour should I use?"),
        ("The flag of {s} is {v}.", "The {s} flag is {v}."),
    ),
    _Relation(
        "country", "town",
        ("Which country is {s} in?", "In which country is the town of {s}?", "Name the country that {s} is in.",
         "My friend lives in {s}. Which country is that in?"),
        ("{s} is in {v}.", "{s} is a town in {v}."),
    ),
    _Relation(
        "food", "town",
        ("What food is {s} famous for?", "What is {s} known for?", "Which food is {s} famous for?",
         "I am visiting {s}. What food should I try there?"),
        ("{s} is famous for {v}.", "{s} is known for its {v}."),
    ),
    _Relation(
        "job", "person",
        ("What is the job of {s}?", "What does {s} do for work?", "What work does {s} do?",
         "I am meeting {s} tomorrow. What is their job?"),
        ("{s} is a {v}.", "{s} works as a {v}."),
    ),
    _Relation(
        "age", "person",
        ("How old is {s}?", "What is the age of {s}?", "Tell me the age of {s}.", "Do you know how old {s} is?"),
        ("{s} is {v} years old.", "{s} is {v}."),
    ),
    _Relation(
        "home", "person",
        ("Where does {s} live?", "Which town does {s} live in?", "What is the home town of {s}?",
         "I want to visit {s}. Which town should I go to?"),
        ("{s} lives in {v}.", "The home town of {s} is {v}."),
    ),
    _Relation(
        "pet", "person",
        ("What pet does {s} have?", "Which animal does {s} keep as a pet?", "What is the pet of {s}?",
         "I am bringing a treat for the pet of {s}. What animal is it?"),
        ("{s} has a {v}.", "The pet of {s} is a {v}."),
    ),
    _Relation(
        "colour", "person",
        ("What is the favourite colour of {s}?", "Which colour does {s} like best?",
         "What colour does {s} like most?", "I am buying {s} a present. Which colour do they like best?"),
        ("The favourite colour of {s} is {v}.", "{s} likes {v} best."),
    ),
)
_RELATION_BY_NAME: dict[str, _Relation] = {relation.name: relation for relation in _RELATIONS}
_RELATIONS_BY_KIND: dict[str, tuple[_Relation, ...]] = {
    kind: tuple(relation for relation in _RELATIONS if relation.subject_kind == kind)
    for kind in ("country", "town", "person")
}
_PERSON_RELATIONS = _RELATIONS_BY_KIND["person"]
# Extraction lists one short clause per person; (plural noun for the instruction, clause).
_EXTRACTION_FORMS: dict[str, tuple[str, str]] = {
    "job": ("jobs", "{s} is a {v}"),
    "age": ("ages", "{s} is {v}"),
    "home": ("home towns", "{s} lives in {v}"),
    "pet": ("pets", "{s} has a {v}"),
    "colour": ("favourite colours", "{s} likes {v}"),
}

# Every phrasing tuple below keeps its LAST phrasing out of train (see `_phrase`).
_ARITHMETIC_PHRASINGS: dict[str, tuple[str, ...]] = {
    "plus": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
             "What do you get when you add {a} to {b}?"),
    "minus": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.",
              "What is left when you take {b} away from {a}?"),
    "times": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} times {b}.",
              "What is the product of {a} and {b}?"),
}
_SORTING_PHRASINGS = ("Sort these words alphabetically: {words}.", "Put these words in alphabetical order: {words}.",
                      "Order these words from A to Z: {words}.",
                      "Rearrange the following words so they are in dictionary order: {words}.")
_COUNT_ALL_PHRASINGS = ("How many words are in the input?", "Count the words in the input.",
                        "How many words does the input list?", "Please tell me the number of words in this list.")
_COUNT_WORD_PHRASINGS = ("How many times does {word} appear in the input?", "Count how often {word} appears in the input.",
                         "How often is {word} in the input?", "In this list, how many times do you see the word {word}?")
_CLASSIFY_PHRASINGS = ("Is {word} {options}?", "Which is {word}: {options}?", "Tell me if {word} is {options}.",
                       "I found the word {word} in a book. Is it {options}?")
# The small families get more train phrasings: their items are few, and they carry the multi-modal answers.
_DESCRIBE_PHRASINGS = ("Write a sentence about {s}.", "Tell me one fact about {s}.", "Say something true about {s}.",
                       "Give one fact about {s}.", "What is one thing you know about {s}?",
                       "I know nothing about {s}. Can you tell me one thing?")
_NAME_ONE_PHRASINGS = ("Name one {kind}.", "Give me one {kind}.", "Tell me one {kind}.", "Name a single {kind}.",
                       "Can you name one {kind}?", "I am writing a story. Suggest one {kind}.")
_LIST_THREE_PHRASINGS = ("List three {kinds}.", "Give me three {kinds}.", "Write down three {kinds}.",
                         "Name three {kinds}.", "Can you list three {kinds}?",
                         "I am making a quiz. Which three {kinds} could I use?")
_EXTRACTION_PHRASINGS = ("List the {noun} of the people in the passage.", "Extract the {noun} of everyone in the passage.",
                         "What are the {noun} of the people in the passage?",
                         "I only need the {noun} from this passage. Can you list them?")
_SUMMARY_PHRASINGS = ("Summarize the passage in one sentence.", "Write a one sentence summary of the passage.",
                      "Give a short summary of the passage.",
                      "My teacher wants a one sentence summary of this passage. Please write it.")
_SUMMARY_TEMPLATES = (
    "{s} is a {age} year old {job} from {home} who has a {pet}.",
    "{s} is a {job} from {home}, is {age} years old and has a {pet}.",
    "{s}, a {age} year old {job}, lives in {home} and has a {pet}.",
)
# Long (vicunaeval) phrasings never appear in train, so none of them is held out.
_SUM_OF_THREE_PHRASINGS = ("What is the sum of {a}, {b} and {c}?", "Add {a}, {b} and {c}.")
_CLASSIFY_MANY_PHRASINGS = ("Which of these words are {plural}: {words}?", "Pick out the {plural} in this list: {words}.")
_TWO_QUESTIONS_PHRASINGS = ("Answer two questions. {first} {second}", "Please answer both: {first} {second}")
_DESCRIBE_TWO_PHRASINGS = ("Write two sentences about {s}.", "Tell me two facts about {s}.")
_NAME_TWO_PHRASINGS = ("Name two {kinds}.", "Give me two {kinds}.")
_LIST_FOUR_PHRASINGS = ("List four {kinds}.", "Give me four {kinds}.")
_SUMMARY_TWO_PHRASINGS = ("Summarize the passage in two sentences.", "Write a two sentence summary of the passage.")


@dataclass(frozen=True)
class _World:
    countries: tuple[_Entity, ...]
    towns: tuple[_Entity, ...]
    people: tuple[_Entity, ...]


def _evenly_spread(rng: random.Random, values: tuple[str, ...], count: int) -> list[str]:
    """`count` values in random order, each value used equally often, so every kind keeps several members."""
    spread = [values[index % len(values)] for index in range(count)]
    rng.shuffle(spread)
    return spread


def _build_world() -> _World:
    rng = random.Random(_WORLD_SEED)
    flags = rng.sample(_COLOURS, len(_COUNTRY_TOWNS))
    n_towns = sum(len(towns) for towns in _COUNTRY_TOWNS.values())
    foods = _evenly_spread(rng, _FOODS, n_towns)
    countries, towns = [], []
    for (country, town_names), flag in zip(_COUNTRY_TOWNS.items(), flags):
        countries.append(_Entity("country", country, {"capital": rng.choice(town_names), "flag": flag}))
        for town in town_names:
            towns.append(_Entity("town", town, {"country": country, "food": foods.pop()}))

    n_people = len(_PEOPLE_NAMES)
    names = rng.sample(_PEOPLE_NAMES, n_people)
    jobs = _evenly_spread(rng, _JOBS, n_people)
    pets = _evenly_spread(rng, _PETS, n_people)
    colours = _evenly_spread(rng, _COLOURS, n_people)
    people = []
    for index, name in enumerate(names):
        country_towns = list(_COUNTRY_TOWNS.values())[index // _PEOPLE_PER_COUNTRY]
        facts = {"job": jobs[index], "age": str(rng.randint(20, 69)), "home": rng.choice(country_towns),
                 "pet": pets[index], "colour": colours[index]}
        people.append(_Entity("person", name, facts))
    return _World(tuple(countries), tuple(towns), tuple(people))


_WORLD = _build_world()
_COUNTRY_OF_TOWN: dict[str, str] = {town.name: town.facts["country"] for town in _WORLD.towns}
_ENTITY_BY_NAME: dict[str, _Entity] = {e.name: e for e in _WORLD.countries + _WORLD.towns + _WORLD.people}


@dataclass(frozen=True)
class _Style:
    """How one set is drawn: which phrasings, base or long variants, and which entities may appear."""

    held_out_phrasing: bool
    long: bool
    countries: tuple[_Entity, ...]
    towns: tuple[_Entity, ...]
    people: tuple[_Entity, ...]


def _style(held_out_phrasing: bool, long: bool, country_names: set[str]) -> _Style:
    return _Style(
        held_out_phrasing=held_out_phrasing,
        long=long,
        countries=tuple(c for c in _WORLD.countries if c.name in country_names),
        towns=tuple(t for t in _WORLD.towns if t.facts["country"] in country_names),
        people=tuple(p for p in _WORLD.people if _COUNTRY_OF_TOWN[p.facts["home"]] in country_names),
    )


_KNOWN_COUNTRY_NAMES = {name for name in _COUNTRY_TOWNS if name != _HELD_OUT_COUNTRY}
_IN_DISTRIBUTION = _style(held_out_phrasing=False, long=False, country_names=_KNOWN_COUNTRY_NAMES)
_HELD_OUT_PHRASINGS = _style(held_out_phrasing=True, long=False, country_names=_KNOWN_COUNTRY_NAMES)
_LONG_VARIANTS = _style(held_out_phrasing=False, long=True, country_names=_KNOWN_COUNTRY_NAMES)
_HELD_OUT_ENTITIES = _style(held_out_phrasing=False, long=False, country_names={_HELD_OUT_COUNTRY})


def _phrase(rng: random.Random, phrasings: tuple[str, ...], style: _Style) -> str:
    """The last phrasing is reserved for selfinst, so train only ever draws from the others."""
    return phrasings[-1] if style.held_out_phrasing else rng.choice(phrasings[:-1])


def _join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _word_count(text: str) -> int:
    return len(text.split())


def _answers(relation: _Relation, subject: _Entity) -> list[str]:
    return [a.format(s=subject.name, v=subject.facts[relation.name]) for a in relation.answers]


def _record(rng: random.Random, category: str, instruction: str, references: list[str], context: str = "") -> dict:
    """The SFT response is drawn uniformly from the references, so the teacher learns every mode."""
    return {"instruction": instruction, "context": context, "response": rng.choice(references),
            "category": category, "references": references}


def _random_subject(rng: random.Random, style: _Style) -> _Entity:
    kind = rng.choice(("country", "town", "person"))
    if kind == "country":
        return rng.choice(style.countries)
    if kind == "town":
        return rng.choice(style.towns)
    return rng.choice(style.people)


def _random_kind(rng: random.Random, style: _Style, min_members: int) -> tuple[str, str, list[str]]:
    """(singular phrase, plural phrase, members in alphabetical order) of a kind with >= min_members members."""
    while True:
        kind = rng.choice(("town_in", "person_in", "town_food", "person_job", "person_colour", "person_pet", "animal"))
        if kind == "town_in":
            country = rng.choice(style.countries).name
            singular, plural = f"town in {country}", f"towns in {country}"
            members = [t.name for t in style.towns if t.facts["country"] == country]
        elif kind == "person_in":
            country = rng.choice(style.countries).name
            singular, plural = f"person who lives in {country}", f"people who live in {country}"
            members = [p.name for p in style.people if _COUNTRY_OF_TOWN[p.facts["home"]] == country]
        elif kind == "town_food":
            food = rng.choice(_FOODS)
            singular, plural = f"town famous for {food}", f"towns famous for {food}"
            members = [t.name for t in style.towns if t.facts["food"] == food]
        elif kind == "person_job":
            job = rng.choice(_JOBS)
            singular, plural = f"person who works as a {job}", f"people who work as {job}s"
            members = [p.name for p in style.people if p.facts["job"] == job]
        elif kind == "person_colour":
            colour = rng.choice(_COLOURS)
            singular, plural = f"person whose favourite colour is {colour}", f"people whose favourite colour is {colour}"
            members = [p.name for p in style.people if p.facts["colour"] == colour]
        elif kind == "person_pet":
            pet = rng.choice(_PETS)
            singular, plural = f"person who has a {pet}", f"people who have a {pet}"
            members = [p.name for p in style.people if p.facts["pet"] == pet]
        else:
            ability = rng.choice(tuple(_ANIMAL_ABILITIES))
            singular, plural = f"animal that can {ability}", f"animals that can {ability}"
            members = list(_ANIMAL_ABILITIES[ability])
        if len(members) >= min_members:
            return singular, plural, sorted(members)


def _passage(rng: random.Random, mentions: list[tuple[_Entity, list[_Relation]]]) -> str:
    """One sentence per (person, relation), each in a random paraphrase, people in the given order."""
    return " ".join(rng.choice(_answers(relation, person)) for person, relations in mentions for relation in relations)


def _arithmetic(rng: random.Random, style: _Style) -> dict:
    if style.long:
        a, b, c = rng.randint(0, 20), rng.randint(0, 20), rng.randint(0, 20)
        instruction = rng.choice(_SUM_OF_THREE_PHRASINGS).format(a=a, b=b, c=c)
        return _record(rng, "arithmetic", instruction, [str(a + b + c)])
    operation = rng.choice(("plus", "minus", "times"))
    if operation == "plus":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        answer = a + b
    elif operation == "minus":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        answer = a - b
    else:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        answer = a * b
    instruction = _phrase(rng, _ARITHMETIC_PHRASINGS[operation], style).format(a=a, b=b)
    return _record(rng, "arithmetic", instruction, [str(answer)])


def _sorting(rng: random.Random, style: _Style) -> dict:
    words = rng.sample(_NOUNS, rng.randint(6, 8) if style.long else rng.randint(3, 5))
    instruction = _phrase(rng, _SORTING_PHRASINGS, style).format(words=", ".join(words))
    return _record(rng, "sorting", instruction, [", ".join(sorted(words))])


def _counting(rng: random.Random, style: _Style) -> dict:
    # Drawing from only 4 distinct words makes repeats, and so counts above one, common.
    pool = rng.sample(_NOUNS, 4)
    words = [rng.choice(pool) for _ in range(rng.randint(10, 16) if style.long else rng.randint(3, 8))]
    if rng.random() < 0.5:
        instruction = _phrase(rng, _COUNT_ALL_PHRASINGS, style)
        answer = len(words)
    else:
        word = rng.choice(pool)
        instruction = _phrase(rng, _COUNT_WORD_PHRASINGS, style).format(word=word)
        answer = words.count(word)
    return _record(rng, "counting", instruction, [str(answer)], context=", ".join(words))


def _classification(rng: random.Random, style: _Style) -> dict:
    if style.long:
        label, _, plural, members = rng.choice(_NOUN_GROUPS)
        others = [word for other_label, _, _, words in _NOUN_GROUPS if other_label != label for word in words]
        words = rng.sample(members, rng.randint(2, 3)) + rng.sample(others, rng.randint(2, 3))
        rng.shuffle(words)
        instruction = rng.choice(_CLASSIFY_MANY_PHRASINGS).format(plural=plural, words=", ".join(words))
        return _record(rng, "classification", instruction, [_join([w for w in words if w in members])])
    if rng.random() < 0.5:
        options = "an animal, a colour or a food"
        label, _, _, members = rng.choice(_NOUN_GROUPS)
        word = rng.choice(members)
    else:
        options = "a person, a town or a country"
        label, entities = rng.choice((("person", style.people), ("town", style.towns), ("country", style.countries)))
        word = rng.choice(entities).name
    instruction = _phrase(rng, _CLASSIFY_PHRASINGS, style).format(word=word, options=options)
    return _record(rng, "classification", instruction, [label])


def _open_qa(rng: random.Random, style: _Style) -> dict:
    if style.long:
        first_subject, second_subject = rng.sample(style.countries + style.towns + style.people, 2)
        first_relation = rng.choice(_RELATIONS_BY_KIND[first_subject.kind])
        second_relation = rng.choice(_RELATIONS_BY_KIND[second_subject.kind])
        instruction = rng.choice(_TWO_QUESTIONS_PHRASINGS).format(
            first=_phrase(rng, first_relation.questions, style).format(s=first_subject.name),
            second=_phrase(rng, second_relation.questions, style).format(s=second_subject.name),
        )
        references = [f"{first} {second}" for first in _answers(first_relation, first_subject)
                      for second in _answers(second_relation, second_subject)]
        return _record(rng, "open_qa", instruction, references)
    subject = _random_subject(rng, style)
    relation = rng.choice(_RELATIONS_BY_KIND[subject.kind])
    instruction = _phrase(rng, relation.questions, style).format(s=subject.name)
    return _record(rng, "open_qa", instruction, _answers(relation, subject))


def _describe(rng: random.Random, style: _Style) -> dict:
    if style.long:
        person = rng.choice(style.people)
        sentences = [_answers(relation, person)[0] for relation in _PERSON_RELATIONS]
        references = [f"{first} {second}" for first, second in itertools.combinations(sentences, 2)]
        instruction = rng.choice(_DESCRIBE_TWO_PHRASINGS).format(s=person.name)
        return _record(rng, "describe", instruction, references)
    subject = _random_subject(rng, style)
    references = [answer for relation in _RELATIONS_BY_KIND[subject.kind] for answer in _answers(relation, subject)]
    instruction = _phrase(rng, _DESCRIBE_PHRASINGS, style).format(s=subject.name)
    return _record(rng, "describe", instruction, references)


def _name_one(rng: random.Random, style: _Style) -> dict:
    if style.long:
        _, plural, members = _random_kind(rng, style, min_members=2)
        instruction = rng.choice(_NAME_TWO_PHRASINGS).format(kinds=plural)
        return _record(rng, "name_one", instruction, [_join(list(pair)) for pair in itertools.combinations(members, 2)])
    singular, _, members = _random_kind(rng, style, min_members=1)
    instruction = _phrase(rng, _NAME_ONE_PHRASINGS, style).format(kind=singular)
    return _record(rng, "name_one", instruction, members)


def _list_three(rng: random.Random, style: _Style) -> dict:
    count = 4 if style.long else 3
    _, plural, members = _random_kind(rng, style, min_members=count)
    if style.long:
        instruction = rng.choice(_LIST_FOUR_PHRASINGS).format(kinds=plural)
    else:
        instruction = _phrase(rng, _LIST_THREE_PHRASINGS, style).format(kinds=plural)
    # Kinds have at most 5 members, so this is at most 10 references, each subset in alphabetical order.
    references = [_join(list(subset)) for subset in itertools.combinations(members, count)]
    return _record(rng, "list_three", instruction, references)


def _closed_qa(rng: random.Random, style: _Style) -> dict:
    # Long passages mention twice the people but only 2 facts each, which keeps them within ~45 words.
    people = rng.sample(style.people, 4 if style.long else 2)
    mentions = [(person, rng.sample(_PERSON_RELATIONS, 2 if style.long else rng.randint(2, 3))) for person in people]
    person, relations = rng.choice(mentions)
    relation = rng.choice(relations)
    instruction = _phrase(rng, relation.questions, style).format(s=person.name)
    return _record(rng, "closed_qa", instruction, [person.facts[relation.name]], context=_passage(rng, mentions))


def _extraction(rng: random.Random, style: _Style) -> dict:
    relation = rng.choice(_PERSON_RELATIONS)
    people = rng.sample(style.people, 4 if style.long else rng.randint(2, 3))
    mentions = []
    for person in people:
        # A second, unasked fact per person makes the passage more than a list of the answers.
        distractor = rng.choice([r for r in _PERSON_RELATIONS if r is not relation])
        mentions.append((person, rng.sample([relation, distractor], 2)))
    noun, clause = _EXTRACTION_FORMS[relation.name]
    instruction = _phrase(rng, _EXTRACTION_PHRASINGS, style).format(noun=noun)
    answer = _join([clause.format(s=p.name, v=p.facts[relation.name]) for p in people]) + "."
    return _record(rng, "extraction", instruction, [answer], context=_passage(rng, mentions))


def _summaries(person: _Entity) -> list[str]:
    return [template.format(s=person.name, **person.facts) for template in _SUMMARY_TEMPLATES]


def _summarization(rng: random.Random, style: _Style) -> dict:
    summarized = ("job", "age", "home", "pet")
    if style.long:
        people = rng.sample(style.people, 2)
        mentions = [(p, rng.sample([r for r in _PERSON_RELATIONS if r.name in summarized], 4)) for p in people]
        first, second = people
        references = [f"{a} {b}" for a in _summaries(first) for b in _summaries(second)]
        instruction = rng.choice(_SUMMARY_TWO_PHRASINGS)
        return _record(rng, "summarization", instruction, references, context=_passage(rng, mentions))
    person = rng.choice(style.people)
    include_colour = rng.random() < 0.5  # a fact the summary templates leave out
    relations = [r for r in _PERSON_RELATIONS if r.name in summarized or include_colour]
    sentences = [rng.choice(_answers(relation, person)) for relation in rng.sample(relations, len(relations))]
    if rng.random() < 0.5:
        # A sentence about the home town, which a good summary of the person leaves out.
        home = _ENTITY_BY_NAME[person.facts["home"]]
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(_answers(_RELATION_BY_NAME["food"], home)))
    instruction = _phrase(rng, _SUMMARY_PHRASINGS, style)
    return _record(rng, "summarization", instruction, _summaries(person), context=" ".join(sentences))


_Family = Callable[[random.Random, _Style], dict]
_ALL_FAMILIES: tuple[_Family, ...] = (
    _arithmetic, _sorting, _counting, _classification, _open_qa, _describe,
    _name_one, _list_three, _closed_qa, _extraction, _summarization,
)


def _draw(
    rng: random.Random,
    set_name: str,
    n_records: int,
    families: tuple[_Family, ...],
    style: _Style,
    taken_prompts: set[tuple[str, str]],
    banned_contexts: set[str],
    min_response_words: int = 1,
) -> list[dict]:
    """n_records records whose prompts are not in taken_prompts (which this extends), families picked uniformly."""
    records: list[dict] = []
    live_families = list(families)
    while len(records) < n_records:
        if not live_families:
            raise ValueError(f"cannot build {n_records} records for {set_name!r}: "
                             f"its task families ran out of unseen prompts after {len(records)}")
        family = rng.choice(live_families)
        for _ in range(_MAX_TRIES_PER_RECORD):
            record = family(rng, style)
            prompt = (record["instruction"], record["context"])
            if (prompt in taken_prompts or record["context"] in banned_contexts
                    or _word_count(record["response"]) < min_response_words):
                continue
            taken_prompts.add(prompt)
            records.append(record)
            break
        else:
            live_families.remove(family)
    return records


def build_suite(seed: int, n_train: int, n_valid: int, n_per_eval_set: int) -> dict[str, list[dict]]:
    """Keys: "train", "valid", and each name in EVAL_SETS. Each record is
    {"instruction": str, "context": str ("" when none), "response": str, "category": str, "references": list[str]}.
    `response` is ONE valid response (what SFT trains on); `references` lists ALL valid responses (Rouge-L takes
    the max over them); response is in references."""
    for name, size in (("train", n_train), ("valid", n_valid), ("each eval set", n_per_eval_set)):
        if size < 0:
            raise ValueError(f"the size of {name} must be >= 0, got {size}")
    rng = random.Random(seed)
    taken_prompts: set[tuple[str, str]] = set()
    # Evaluation sets are drawn first, so they depend only on (seed, n_per_eval_set), not on the train size.
    evaluation = {
        "dollyeval": _draw(rng, "dollyeval", n_per_eval_set, _ALL_FAMILIES, _IN_DISTRIBUTION, taken_prompts, set()),
        "selfinst": _draw(rng, "selfinst", n_per_eval_set, _ALL_FAMILIES, _HELD_OUT_PHRASINGS, taken_prompts, set()),
        "vicunaeval": _draw(rng, "vicunaeval", n_per_eval_set, _ALL_FAMILIES, _LONG_VARIANTS, taken_prompts, set()),
        "sni": _draw(rng, "sni", n_per_eval_set, (_extraction, _summarization), _IN_DISTRIBUTION, taken_prompts,
                     set(), min_response_words=_SNI_MIN_RESPONSE_WORDS),
        "unni": _draw(rng, "unni", n_per_eval_set, (_open_qa, _describe, _extraction, _summarization),
                      _HELD_OUT_ENTITIES, taken_prompts, set(), min_response_words=_UNNI_MIN_RESPONSE_WORDS),
    }
    sni_passages = {record["context"] for record in evaluation["sni"]}
    valid = _draw(rng, "valid", n_valid, _ALL_FAMILIES, _IN_DISTRIBUTION, taken_prompts, sni_passages)
    train = _draw(rng, "train", n_train, _ALL_FAMILIES, _IN_DISTRIBUTION, taken_prompts, sni_passages)
    return {"train": train, "valid": valid, **evaluation}


def _document(rng: random.Random, topic: str) -> str:
    """A few sentences about one topic: a world entity's name, an animal ability, or a word group."""
    if topic in _ENTITY_BY_NAME:
        entity = _ENTITY_BY_NAME[topic]
        sentences = [rng.choice(_answers(relation, entity)) for relation in _RELATIONS_BY_KIND[entity.kind]]
        if entity.kind == "country":
            towns = [t.name for t in _WORLD.towns if t.facts["country"] == entity.name]
            sentences.append(f"{_join(rng.sample(towns, len(towns)))} are towns in {entity.name}.")
        if entity.kind == "town":
            residents = [p.name for p in _WORLD.people if p.facts["home"] == entity.name]
            if len(residents) == 1:
                sentences.append(f"{residents[0]} lives in {entity.name}.")
            if len(residents) > 1:
                sentences.append(f"{_join(rng.sample(residents, len(residents)))} live in {entity.name}.")
        rng.shuffle(sentences)
        return " ".join([f"{entity.name} is a {entity.kind}."] + sentences)
    if topic in _ANIMAL_ABILITIES:
        animals = rng.sample(_ANIMAL_ABILITIES[topic], len(_ANIMAL_ABILITIES[topic]))
        return " ".join(f"The {animal} can {topic}." for animal in animals)
    _, label_with_article, plural, members = next(group for group in _NOUN_GROUPS if group[0] == topic)
    listed = rng.sample(members, rng.randint(3, 5))
    return f"{_join(listed).capitalize()} are {plural}. {rng.choice(members).capitalize()} is {label_with_article}."


def build_pretrain_corpus(seed: int, n_documents: int) -> list[str]:
    """Prose documents (a few sentences each) from the same synthetic world, for the pre-training (PT) loss and for
    pre-training the tiny base models."""
    if n_documents < 0:
        raise ValueError(f"n_documents must be >= 0, got {n_documents}")
    rng = random.Random(seed)
    topics = list(_ENTITY_BY_NAME) + list(_ANIMAL_ABILITIES) + [group[0] for group in _NOUN_GROUPS]
    documents: list[str] = []
    order: list[str] = []
    for index in range(n_documents):
        # Every topic once per round (in a fresh order), so every fact is covered once n_documents >= len(topics).
        if index % len(topics) == 0:
            order = rng.sample(topics, len(topics))
        documents.append(_document(rng, order[index % len(topics)]))
    return documents
