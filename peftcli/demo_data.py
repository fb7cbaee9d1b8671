"""The quickstart's task, generated deterministically: turn a sentence about a person into a fixed
JSON schema. A base model gets the exact schema almost never; a short LoRA run learns it, so the
before/after exact-match number shows that training worked.

    python -m peftcli.demo_data --out data/quickstart
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = 'Extract the person as JSON with keys "name", "age", "city", "job".'
NAMES = ("Alice Bob Carla Dmitri Elena Farid Grace Hiro Ines Jamal Kofi Lena Mateo Nadia Omar Priya Quinn Rosa "
         "Sven Tariq Uma Viktor Wen Ximena Yusuf Zoe Anton Beatriz Chen Dalia Emeka Freya Gustavo Hana Ivan "
         "Julia Kenji Laila Marco Noor Oscar Paula Rafael Sofia Tomas Valentina Walter Yara").split()
CITIES = ("Paris Lagos Tokyo Lima Oslo Cairo Denver Madrid Seoul Toronto Nairobi Berlin Mumbai Sydney Quito Dublin "
          "Hanoi Prague Austin Lisbon Manila Vienna Accra Bogota Helsinki Kyoto Marseille Osaka Porto Zurich").split()
JOBS = ("nurse teacher pilot chef plumber lawyer architect farmer baker engineer journalist dentist painter "
        "librarian electrician pharmacist carpenter firefighter programmer musician").split()
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}, {age}, a {job} based in {city}.",
    "In {city} lives {name}, a {job} aged {age}.",
    "{name} ({age}) works as a {job} in {city}.",
    "At {age}, {name} is working as a {job} in {city}.",
    "Our new neighbour in {city} is {name}; {name} is {age} and works as a {job}.",
    "{city} is home to {name}, who is {age} years old and a {job} by trade.",
    "The {job} {name}, age {age}, moved to {city} last year.",
]


def example(rng: random.Random, names=NAMES) -> dict:
    person = {"name": rng.choice(names), "age": rng.randint(19, 79), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    sentence = rng.choice(TEMPLATES).format(**person)
    return {"instruction": INSTRUCTION, "input": sentence, "output": json.dumps(person)}


def generate(n_train: int = 800, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    # held-out names make eval measure the schema, not memorised people
    held_out = set(NAMES[-8:])
    train = [example(rng, [n for n in NAMES if n not in held_out]) for _ in range(n_train)]
    evals = [example(rng) for _ in range(n_eval)]
    return train, evals


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/quickstart")
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = generate(args.train, args.eval, args.seed)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} train and {len(evals)} eval rows to {out}")


if __name__ == "__main__":
    main()
