"""Long-context tasks generated offline, deterministically from a seed, RULER-style.

Tasks (`TASKS`):
- `passkey`: noise filler ("The grass is green. ...") with "The pass key is N. Remember it. N is the
  pass key." at the requested depth (Mohtashami & Jaggi; RULER's noise haystack).
- `niah_single`: natural-text haystack (licence texts shipped with the OS) with one needle "One of
  the special magic numbers for {key} is: {value}." at the requested depth (RULER niah_single_2).
- `niah_multikey`: as niah_single plus 3 distractor needles with other keys at random depths
  (RULER niah_multikey_1).
- `niah_multivalue`: one key with 4 values at random depths (the first at the requested depth);
  all 4 must be found (RULER niah_multivalue).
- `vt`: variable tracking: one chain `VAR A = 12345`, `VAR B = VAR A`, ... (4 hops) spread through
  the noise filler (the first at the requested depth); the answer is all 5 names (RULER vt).
- `cwe`: common-word extraction: a numbered word list in which 10 words are frequent; the answer is
  those 10 (RULER cwe; occurrence counts scaled down at short lengths as RULER does).

Prompts are the model's chat template around RULER's task templates, with RULER's answer prefix
opening the assistant turn; lengths are in tokens of the model's tokenizer (the prompt, template
included, is the longest that fits `length`). Scores: RULER's `string_match_all` — the fraction of
reference strings found in the output, case-insensitive, x100.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

LICENCE_DIR = Path("/usr/share/common-licenses")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

ADJECTIVES = (
    "amber ancient angry bitter bold brave bright brisk calm careful cheerful clever cold cosmic "
    "crimson curious daring dark dusty eager early elegant empty fancy fierce fluffy frozen gentle "
    "giant glossy golden grumpy happy hidden hollow humble icy jolly kind lazy little lively lonely "
    "loud lucky magic mellow merry mighty misty modern muddy narrow noble odd olive pale patient "
    "plain polite proud purple quick quiet rapid rare rough royal rusty sandy scarlet shaggy sharp "
    "shiny silent silver simple sleepy slow smooth snowy soft solid sour spicy steady stormy strange "
    "sturdy sunny sweet swift tall tame tender tiny tired vivid warm wild windy wise witty young zesty"
).split()

NOUNS = (
    "anchor apple arrow badger bakery balloon banjo barrel basket beacon beetle bicycle blanket "
    "bottle bucket butter cabin camel candle canyon carpet castle cellar cheetah cherry chimney "
    "cobra comet copper cottage crayon cricket crystal cup dagger desert dolphin donkey dragon "
    "drum eagle engine falcon feather ferry fiddle forest fossil fountain garden giraffe glacier "
    "goblet guitar hammer harbor helmet hermit hornet island jacket jaguar jungle kettle kitten "
    "ladder lantern lemon leopard library lizard lobster magnet mango meadow mirror monkey mountain "
    "needle oyster paddle palace panther parrot peach pebble pencil pepper pillow pirate planet "
    "pocket potato puzzle rabbit radish raven ribbon river rocket saddle salmon sandal scarf "
    "scooter shovel spider sponge squirrel statue tiger tomato tractor trumpet tulip tunnel turtle "
    "umbrella valley velvet violin volcano wagon walnut whale whistle window wizard wolf zebra"
).split()

VERBS = (
    "admire borrow bounce breathe carve chase climb collect cook crawl dance deliver dig drift "
    "explore fetch float fold gather giggle glide guard hover hunt juggle kneel knit launch listen "
    "march melt mend nibble paint paddle plant polish pour repair roam row sail scatter sew shiver "
    "sketch slide sniff sparkle spin sprint stack stir swim tickle travel tumble twist wander wash "
    "whisper wiggle yawn"
).split()


@dataclass
class Sample:
    task: str
    index: int
    seed: int
    length: int  # requested prompt length in tokens
    depth: float | None  # requested needle depth (fraction of the context), None if not applicable
    prompt_ids: list[int]
    references: list[str]
    max_tokens: int
    query: str = ""  # the question asked (for inspection)
    needle_depths: list[float] = field(default_factory=list)  # measured, fraction of context tokens

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def sample_id(self) -> str:
        depth = "" if self.depth is None else f"-d{self.depth:g}"
        return f"{self.task}-L{self.length}{depth}-{self.index}"

    def to_dict(self, with_prompt: bool = False) -> dict:
        data = asdict(self)
        data["prompt_len"] = self.prompt_len
        data["sample_id"] = self.sample_id
        if not with_prompt:
            data.pop("prompt_ids")
        return data


# -- scoring ---------------------------------------------------------------------------------------


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's score of one sample: the fraction of references found in the output
    (case-insensitive), x100."""
    if not references:
        raise ValueError("no reference strings")
    pred = prediction.lower()
    return 100.0 * sum(1.0 for ref in references if ref.lower() in pred) / len(references)


def score(sample: Sample, prediction: str) -> float:
    return string_match_all(prediction, sample.references)


# -- text sources ----------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=1)
def natural_documents() -> tuple[tuple[str, str], ...]:
    """(name, text) of the long natural texts available offline: the licence texts shipped with
    the OS (deduplicated, sorted by name). Empty where there are none."""
    docs: dict[Path, tuple[str, str]] = {}
    if LICENCE_DIR.is_dir():
        for path in sorted(LICENCE_DIR.iterdir()):
            real = path.resolve()
            if real.is_file() and real not in docs:
                text = real.read_text(errors="replace")
                if len(text) > 2000:
                    docs[real] = (path.name, text)
    return tuple(docs.values())


@lru_cache(maxsize=1)
def natural_sentences() -> tuple[str, ...]:
    """Sentences of the offline natural texts (for the needle haystacks); noise if none exist."""
    sentences: list[str] = []
    for _, text in natural_documents():
        for part in re.split(r"(?<=[.;:!?])\s+", _normalise(text)):
            if 20 <= len(part) <= 400 and not re.search(r"magic number|pass key", part, re.I):
                sentences.append(part)
    return tuple(sentences) or tuple(NOISE.split(". "))


def noise_units(n: int, rng: random.Random) -> list[str]:
    return [NOISE] * n


def essay_units(n: int, rng: random.Random, start: int | None = None) -> list[str]:
    sentences = natural_sentences()
    first = rng.randrange(len(sentences)) if start is None else start
    return [sentences[(first + i) % len(sentences)] for i in range(n)]


# -- prompt construction ---------------------------------------------------------------------------


def render(tokenizer, user: str, answer_prefix: str) -> str:
    """The chat template around the user message, with the answer prefix opening the reply."""
    messages = [{"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (ValueError, AttributeError):  # a tokenizer without a chat template
        text = user + "\n"
    return text + answer_prefix


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def fit_units(target: int, build: Callable[[int], str], tokenizer, upper: int) -> tuple[int, list[int]]:
    """The largest unit count n in [0, upper] whose prompt `build(n)` has <= target tokens
    (binary search; prompts grow with n)."""
    lo, hi = 0, max(upper, 1)
    while len(encode(tokenizer, build(hi))) <= target and hi < 1 << 20:
        lo, hi = hi, hi * 2
    best = encode(tokenizer, build(lo))
    if len(best) > target:
        raise ValueError(f"length {target} is too short for this task's template "
                         f"({len(best)} tokens without any context)")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = encode(tokenizer, build(mid))
        if len(ids) <= target:
            lo, best = mid, ids
        else:
            hi = mid
    return lo, best


def insert_at(units: list[str], items: list[tuple[float, str]]) -> list[str]:
    """Insert each (depth, text) between units, at the unit boundary where the share of the
    haystack's characters before it is closest to `depth` (characters track tokens closely)."""
    n = len(units)
    cumulative = [0]
    for unit in units:
        cumulative.append(cumulative[-1] + len(unit) + 1)
    total = max(cumulative[-1], 1)
    slots: dict[int, list[str]] = {}
    for depth, text in items:
        target = depth * total
        index = min(range(n + 1), key=lambda i: (abs(cumulative[i] - target), i))
        slots.setdefault(index, []).append(text)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(slots.get(i, []))
        if i < n:
            out.append(units[i])
    return out


def measure_depths(tokenizer, prompt: str, context: str, needles: list[str]) -> list[float]:
    """Where each needle starts: the context tokens before it over the context tokens other than
    its own (0: first, 1: last)."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    c0 = prompt.index(context)
    c1 = c0 + len(context)

    def token_at(char: int) -> int:
        for i, (a, b) in enumerate(offsets):
            if b > char:
                return i
        return len(offsets)

    t0, t1 = token_at(c0), token_at(c1)
    span = max(t1 - t0, 1)
    depths = []
    for needle in needles:
        pos = prompt.index(needle, c0)
        start, end = token_at(pos), token_at(pos + len(needle))
        depths.append((start - t0) / max(span - (end - start), 1))
    return depths


def random_number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def random_keys(rng: random.Random, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in keys:
            keys.append(key)
    return keys


# -- the tasks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    user_template: str  # with {context}
    answer_prefix: str
    references: list[str]
    needles: list[tuple[float, str]]  # (depth, text) inserted into the haystack
    haystack: Callable[[int], list[str]]  # n -> filler units
    joiner: str
    max_tokens: int
    query: str


NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n{context}\n"
                 "What {what} for {key} mentioned in the provided text?")


def build_passkey(rng: random.Random, depth: float) -> Built:
    passkey = random_number(rng, 5)
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    return Built(
        user_template=("There is an important info hidden inside a lot of irrelevant text. Find it and "
                       "memorize it. I will quiz you about the important information there.\n\n"
                       "{context}\n\nWhat is the pass key?"),
        answer_prefix="The pass key is",
        references=[passkey], needles=[(depth, needle)],
        haystack=lambda n: noise_units(n, rng), joiner=" ", max_tokens=12, query="What is the pass key?",
    )


def _essay(rng: random.Random) -> Callable[[int], list[str]]:
    start = rng.randrange(len(natural_sentences()))
    return lambda n: essay_units(n, rng, start)


def build_niah_single(rng: random.Random, depth: float) -> Built:
    key, value = random_keys(rng, 1)[0], random_number(rng, 7)
    needle = f"One of the special magic numbers for {key} is: {value}."
    return Built(
        user_template=NIAH_TEMPLATE.replace("{kind}", "numbers").replace(
            "{what}", "is the special magic number").replace("{key}", key),
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
        references=[value], needles=[(depth, needle)], haystack=_essay(rng), joiner=" ",
        max_tokens=24, query=f"special magic number for {key}",
    )


def build_niah_multikey(rng: random.Random, depth: float) -> Built:
    keys = random_keys(rng, 4)
    values = [random_number(rng, 7) for _ in keys]
    needles = [(depth, f"One of the special magic numbers for {keys[0]} is: {values[0]}.")]
    needles += [(rng.random(), f"One of the special magic numbers for {k} is: {v}.")
                for k, v in zip(keys[1:], values[1:])]
    return Built(
        user_template=NIAH_TEMPLATE.replace("{kind}", "numbers").replace(
            "{what}", "is the special magic number").replace("{key}", keys[0]),
        answer_prefix=f"The special magic number for {keys[0]} mentioned in the provided text is",
        references=[values[0]], needles=needles, haystack=_essay(rng), joiner=" ",
        max_tokens=24, query=f"special magic number for {keys[0]} (3 distractor keys)",
    )


def build_niah_multivalue(rng: random.Random, depth: float) -> Built:
    key = random_keys(rng, 1)[0]
    values = []
    while len(values) < 4:
        v = random_number(rng, 7)
        if v not in values:
            values.append(v)
    depths = [depth] + [rng.random() for _ in values[1:]]
    needles = [(d, f"One of the special magic numbers for {key} is: {v}.") for d, v in zip(depths, values)]
    return Built(
        user_template=NIAH_TEMPLATE.replace("{kind}", "numbers").replace(
            "{what}", "are all the special magic numbers").replace("{key}", key),
        answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
        references=values, needles=needles, haystack=_essay(rng), joiner=" ",
        max_tokens=64, query=f"all 4 special magic numbers for {key}",
    )


def build_vt(rng: random.Random, depth: float, hops: int = 4) -> Built:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = random_number(rng, 5)
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    # the chain in order, the first at `depth`, the rest spread over what follows
    later = sorted(depth + (1.0 - depth) * rng.random() for _ in range(hops))
    needles = list(zip([depth] + later, lines))
    return Built(
        user_template=("Memorize and track the chain(s) of variable assignment hidden in the following "
                       "text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
                       f"{value} in the text above."),
        answer_prefix=(f"Answer: According to the chain(s) of variable assignment in the text above, "
                       f"{hops + 1} variables are assigned the value {value}, they are:"),
        references=names, needles=needles, haystack=lambda n: noise_units(n, rng), joiner=" ",
        max_tokens=32, query=f"variables assigned {value}",
    )


CWE_WORDS = tuple(dict.fromkeys(NOUNS + VERBS + ADJECTIVES))


def build_cwe(rng: random.Random, length: int, num_cw: int = 10) -> Built:
    """RULER cwe: `num_cw` common words each `freq_cw` times, the others `freq_ucw` times, shuffled
    into a numbered list; RULER's frequencies (30/3) are scaled down for short prompts so the
    common words take at most about half of the list."""
    words = list(CWE_WORDS)
    rng.shuffle(words)
    common, pool = words[:num_cw], words[num_cw:]
    entries_fit = max(length // 6, 4 * num_cw)  # ~6 tokens per "123. word" entry
    freq_cw = max(2, min(30, entries_fit // (2 * num_cw)))
    freq_ucw = max(1, min(3, freq_cw // 10))
    order_seed = rng.randrange(1 << 30)

    def haystack(n: int) -> list[str]:
        items = [w for w in common for _ in range(freq_cw)]
        items += [pool[i % len(pool)] for i in range(n) for _ in range(freq_ucw)]
        random.Random(order_seed).shuffle(items)
        return [f"{i + 1}. {w}" for i, w in enumerate(items)]

    return Built(
        user_template=("Below is a numbered list of words. In these words, some appear more often than "
                       "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
                       f"the {num_cw} most common words in the above list?"),
        answer_prefix=f"Answer: The top {num_cw} words that appear most often in the list are:",
        references=common, needles=[], haystack=haystack, joiner="\n", max_tokens=96,
        query=f"the {num_cw} most common words ({freq_cw} times each; others {freq_ucw})",
    )


BUILDERS: dict[str, Callable[..., Built]] = {
    "passkey": build_passkey,
    "niah_single": build_niah_single,
    "niah_multikey": build_niah_multikey,
    "niah_multivalue": build_niah_multivalue,
    "vt": build_vt,
    "cwe": build_cwe,
}
TASKS = tuple(BUILDERS)
DEPTH_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt")


def generate(task: str, length: int, tokenizer, seed: int = 0, index: int = 0,
             depth: float | None = 0.5) -> Sample:
    """One sample of `task` whose prompt (chat template included) has at most `length` tokens and
    as many as fit; the same (task, length, seed, index, depth) always gives the same sample."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if task in DEPTH_TASKS:
        depth = 0.5 if depth is None else float(depth)
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
    else:
        depth = None
    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{index}")
    built = build_cwe(rng, length) if task == "cwe" else BUILDERS[task](rng, depth)

    def context_of(n: int) -> str:
        return built.joiner.join(insert_at(built.haystack(n), built.needles))

    def prompt_of(n: int) -> str:
        return render(tokenizer, built.user_template.replace("{context}", context_of(n)), built.answer_prefix)

    unit_tokens = max(1, len(encode(tokenizer, built.joiner.join(built.haystack(8)))) // 8)
    n, ids = fit_units(length, prompt_of, tokenizer, upper=max(1, length // unit_tokens))
    prompt = prompt_of(n)
    context = context_of(n)
    needles = [text for _, text in built.needles]
    depths = measure_depths(tokenizer, prompt, context, needles) if needles else []
    return Sample(task=task, index=index, seed=seed, length=length, depth=depth, prompt_ids=ids,
                  references=list(built.references), max_tokens=built.max_tokens, query=built.query,
                  needle_depths=depths)


def generate_all(tasks: list[str], lengths: list[int], depths: list[float], samples: int, tokenizer,
                 seed: int = 0) -> list[Sample]:
    """`samples` samples per (task, length, depth); tasks without a depth get `samples` per length
    times the number of depths, so every task has as many samples."""
    out: list[Sample] = []
    for task in tasks:
        for length in lengths:
            if task in DEPTH_TASKS:
                for depth in depths:
                    out += [generate(task, length, tokenizer, seed, i, depth) for i in range(samples)]
            else:
                out += [generate(task, length, tokenizer, seed, i, None) for i in range(samples * len(depths))]
    return out
