"""Built-in synthetic visual tasks: tiny images of coloured shapes with a question and a checkable answer.

Every task follows the same pipeline:

1. ``sample_scene`` draws a random *scene* (background colour, a list of shapes, and the question's free
   parameter such as the asked colour) from a seeded ``random.Random``.
2. ``render_scene`` turns the scene into a PIL RGB image (no anti-aliasing, so every non-background pixel
   has exactly one of the palette colours).
3. The task's ``question`` and ``answer`` functions read the scene, and ``think`` writes a short templated
   reasoning from the scene and an answer.

The rows use vlmalign's conversational format (typed content blocks plus an ``images`` list) in one of three
layouts: ``sft`` (``messages``), ``preference`` (``prompt``/``chosen``/``rejected``) and ``prompt`` (for RL).

The ``color`` task follows the recipe in ``learnable-task-feasibility.md``: it is the task a tiny random VLM
provably learns in a few hundred CPU steps, so do not change its drawing parameters lightly.

Train, validation and test splits use different random streams and are disjoint *by construction*: the
background colour's channel sum modulo 3 is 0 for train, 1 for validation and 2 for test, and the background is
always visible, so no image can appear in two splits.
"""

from __future__ import annotations

import io
import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

import datasets

from ..models.vocabulary import ANSWER_TAGS, COLORS, DIGITS, KINDS, SIDES, TASK_WORDS  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

#: The shape colours (`models/vocabulary.py` lists the names) and their exact RGB values. Every colour has a channel
#: below 200, so it can never be mistaken for the pale background (all channels in 200..255).
PALETTE: dict[str, tuple[int, int, int]] = dict(zip(COLORS, [
    (255, 0, 0),      # red
    (0, 160, 0),      # green
    (0, 0, 255),      # blue
    (255, 220, 0),    # yellow
    (128, 0, 128),    # purple
    (255, 128, 0),    # orange
], strict=True))

ANSWER_FORMATS: tuple[str, ...] = ("answer", "think", "plain")
ROW_FORMATS: tuple[str, ...] = ("sft", "preference", "prompt")

#: The background's channel sum modulo 3 encodes the split, which makes splits disjoint by construction.
SPLIT_BUCKETS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}

BACKGROUND_MIN = 200  # each background channel is drawn from BACKGROUND_MIN..255

# ---------------------------------------------------------------------------------------------------------------
# Scenes: sampling and rendering
# ---------------------------------------------------------------------------------------------------------------

# Sampling uses ``random.Random`` (fast for scalars) and only its ``random()`` method, whose sequence Python
# guarantees to stay the same across versions; the helpers below build everything else from it.


def _below(rng: random.Random, n: int) -> int:
    """A uniform integer in ``0..n-1``."""
    return min(int(rng.random() * n), n - 1)


def _pick(rng: random.Random, items: list):
    """A uniform element of ``items``."""
    return items[_below(rng, len(items))]


def _shuffled(rng: random.Random, items: list) -> list:
    """A uniformly shuffled copy of ``items`` (Fisher-Yates)."""
    items = list(items)
    for i in range(len(items) - 1, 0, -1):
        j = _below(rng, i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def _sample_background(rng: random.Random, bucket: int) -> list[int]:
    """A pale RGB colour (each channel 200-255) whose channel sum is ``bucket`` modulo 3."""
    red = BACKGROUND_MIN + _below(rng, 256 - BACKGROUND_MIN)
    green = BACKGROUND_MIN + _below(rng, 256 - BACKGROUND_MIN)
    blues = [b for b in range(BACKGROUND_MIN, 256) if (red + green + b) % 3 == bucket]
    return [red, green, _pick(rng, blues)]


def _shape(kind: str, color: str, center: list[float], radius: float) -> dict:
    """The scene description of one shape."""
    return {"kind": kind, "color": color, "rgb": list(PALETTE[color]), "center": center, "radius": radius}


def _sample_box(rng: random.Random, size: int, radius_range: tuple[float, float]) -> tuple[list[float], float]:
    """A random (centre, radius) whose bounding box ``[c - r, c + r]`` lies fully inside the image.

    ``radius_range`` is a fraction of the image size. Values are rounded to 2 decimals so that the scene JSON
    describes exactly what is drawn.
    """
    low, high = radius_range
    radius = round((low + (high - low) * rng.random()) * size, 2)
    room = size - 1 - 2 * radius
    center = [min(round(radius + room * rng.random(), 2), size - 1 - radius) for _ in range(2)]
    return center, radius


def _sample_shape(rng: random.Random, size: int, radius_range: tuple[float, float],
                  color: str | None = None) -> dict:
    """One shape of a random kind (and colour unless given) placed fully inside the image."""
    center, radius = _sample_box(rng, size, radius_range)
    kind = _pick(rng, KINDS)
    color = color if color is not None else _pick(rng, COLORS)
    return _shape(kind, color, center, radius)


def _boxes_apart(a: dict, b: dict, gap: float) -> bool:
    """True when the bounding boxes of two shapes are at least ``gap`` pixels apart along x or y."""
    reach = a["radius"] + b["radius"] + gap
    dx = abs(a["center"][0] - b["center"][0])
    dy = abs(a["center"][1] - b["center"][1])
    return dx >= reach or dy >= reach


def _sample_separate_shapes(rng: random.Random, size: int, radius_range: tuple[float, float],
                            colors: list[str], gap: float = 2.5, tries: int = 30) -> list[dict]:
    """One shape per colour, with bounding boxes at least ``gap`` pixels apart, so no two shapes touch.

    Rejection sampling: each shape gets ``tries`` attempts, and the scene starts again when one finds no room.
    """
    while True:
        shapes: list[dict] = []
        for color in colors:
            for _ in range(tries):
                shape = _sample_shape(rng, size, radius_range, color)
                if all(_boxes_apart(shape, other, gap) for other in shapes):
                    shapes.append(shape)
                    break
            else:
                break
        if len(shapes) == len(colors):
            return shapes


def _new_scene(rng: random.Random, size: int, bucket: int) -> dict:
    """An empty scene: image size and background colour."""
    return {"image_size": size, "background": _sample_background(rng, bucket), "shapes": [], "query": {}}


def _shape_outline(shape: dict) -> tuple[str, list[float]]:
    """How PIL draws a shape: ('ellipse' | 'rectangle', bbox) or ('polygon', vertices)."""
    (cx, cy), r = shape["center"], shape["radius"]
    if shape["kind"] == "circle":
        return "ellipse", [cx - r, cy - r, cx + r, cy + r]
    if shape["kind"] == "square":
        return "rectangle", [cx - r, cy - r, cx + r, cy + r]
    if shape["kind"] == "triangle":  # apex up, base 2r, height 2r: fills half its bounding box
        return "polygon", [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
    raise ValueError(f"unknown shape kind {shape['kind']!r}")


def render_scene(scene: dict) -> Image.Image:
    """Draw a scene as a PIL RGB image, without anti-aliasing."""
    size = scene["image_size"]
    image = Image.new("RGB", (size, size), tuple(scene["background"]))
    draw = ImageDraw.Draw(image)
    for shape in scene["shapes"]:
        method, coords = _shape_outline(shape)
        getattr(draw, method)(coords, fill=tuple(shape["rgb"]))
    return image


# ---------------------------------------------------------------------------------------------------------------
# The tasks
# ---------------------------------------------------------------------------------------------------------------

BIG_RADIUS = (0.20, 0.35)  # the proven-learnable size (fraction of the image size)
SMALL_RADIUS = (0.11, 0.17)  # several shapes must fit side by side
MEDIUM_RADIUS = (0.12, 0.20)


def _scene_one_big_shape(rng: random.Random, size: int, bucket: int) -> dict:
    """``color`` and ``shape``: one big shape anywhere fully inside the image."""
    scene = _new_scene(rng, size, bucket)
    scene["shapes"] = [_sample_shape(rng, size, BIG_RADIUS)]
    return scene


def _scene_count(rng: random.Random, size: int, bucket: int) -> dict:
    """``count``: 1-4 small non-touching shapes of any colours."""
    scene = _new_scene(rng, size, bucket)
    count = 1 + _below(rng, 4)
    colors = [_pick(rng, COLORS) for _ in range(count)]
    scene["shapes"] = _sample_separate_shapes(rng, size, SMALL_RADIUS, colors)
    return scene


def _scene_count_color(rng: random.Random, size: int, bucket: int) -> dict:
    """``count_color``: 2-4 small shapes using 2-3 colours.

    With probability 3/4 the asked colour is that of a random shape (so frequent colours are asked more often,
    which spreads the answers over 1-3), otherwise a colour not in the image (answer 0).
    """
    scene = _new_scene(rng, size, bucket)
    count = 2 + _below(rng, 3)
    n_colors = min(count, 2 + _below(rng, 2))
    used = _shuffled(rng, COLORS)[:n_colors]
    colors = _shuffled(rng, used + [_pick(rng, used) for _ in range(count - n_colors)])
    scene["shapes"] = _sample_separate_shapes(rng, size, SMALL_RADIUS, colors)
    unused = [c for c in COLORS if c not in used]
    pool = colors if rng.random() < 0.75 else unused
    scene["query"] = {"color": _pick(rng, pool)}
    return scene


def _scene_left_color(rng: random.Random, size: int, bucket: int, gap: float = 2.5) -> dict:
    """``left_color``: two shapes of different colours, horizontally apart; ask for the left or right one.

    The right shape's box starts at least ``gap`` pixels right of the left shape's box, by construction.
    """
    scene = _new_scene(rng, size, bucket)
    left, right = (_sample_shape(rng, size, MEDIUM_RADIUS, color) for color in _shuffled(rng, COLORS)[:2])
    r_left, r_right = left["radius"], right["radius"]
    reach = r_left + r_right + gap
    x_left = round(r_left + rng.random() * (size - 1 - r_right - reach - r_left), 2)
    x_right = round(x_left + reach + rng.random() * (size - 1 - r_right - x_left - reach), 2)
    left["center"][0], right["center"][0] = x_left, x_right
    scene["shapes"] = [left, right]
    scene["query"] = {"side": _pick(rng, SIDES)}
    return scene


def _shapes_left_to_right(scene: dict) -> list[dict]:
    """The scene's shapes ordered by the x of their centres."""
    return sorted(scene["shapes"], key=lambda s: s["center"][0])


def _listing(scene: dict) -> str:
    """'red circle . blue square .': every shape, left to right."""
    return " ".join(f"{s['color']} {s['kind']} ." for s in _shapes_left_to_right(scene))


def _left_color_answer(scene: dict) -> str:
    """The colour of the shape on the asked side."""
    shapes = _shapes_left_to_right(scene)
    return (shapes[0] if scene["query"]["side"] == "left" else shapes[-1])["color"]


def _left_color_wrong_answers(scene: dict, answer: str) -> list[str]:
    """The other shape's colour first (the most plausible mistake), then the colours not in the image."""
    present = [s["color"] for s in _shapes_left_to_right(scene)]
    return [c for c in present if c != answer] + [c for c in COLORS if c not in present]


def _near_digits(answer: str, low: int, high: int) -> list[str]:
    """Off-by-one counts within ``low..high`` (the most plausible wrong counts)."""
    value = int(answer)
    return [str(v) for v in (value - 1, value + 1) if low <= v <= high]


@dataclass(frozen=True)
class Task:
    """A synthetic visual question task.

    Attributes:
        name: registry key.
        sample_scene: ``(rng, image_size, split_bucket) -> scene dict``.
        question: ``scene -> question text``.
        answer: ``scene -> answer word`` (the ``solution``).
        think: ``(scene, answer) -> short reasoning`` ending in the given (possibly wrong) answer.
        wrong_answers: ``(scene, answer) -> plausible wrong answers`` for preference pairs.
    """

    name: str
    sample_scene: Callable[[random.Random, int, int], dict]
    question: Callable[[dict], str]
    answer: Callable[[dict], str]
    think: Callable[[dict, str], str]
    wrong_answers: Callable[[dict, str], list[str]]


TASKS: dict[str, Task] = {
    "color": Task(
        name="color",
        sample_scene=_scene_one_big_shape,
        question=lambda scene: "what color is the shape ?",
        answer=lambda scene: scene["shapes"][0]["color"],
        think=lambda scene, answer: f"the shape is {answer} .",
        wrong_answers=lambda scene, answer: [c for c in COLORS if c != answer],
    ),
    "shape": Task(
        name="shape",
        sample_scene=_scene_one_big_shape,
        question=lambda scene: "what is the shape ?",
        answer=lambda scene: scene["shapes"][0]["kind"],
        think=lambda scene, answer: f"the {scene['shapes'][0]['color']} shape is {answer} .",
        wrong_answers=lambda scene, answer: [k for k in KINDS if k != answer],
    ),
    "count": Task(
        name="count",
        sample_scene=_scene_count,
        question=lambda scene: "how many shapes are there ?",
        answer=lambda scene: str(len(scene["shapes"])),
        think=lambda scene, answer: f"{_listing(scene)} there are {answer} .",
        wrong_answers=lambda scene, answer: _near_digits(answer, 1, 4),
    ),
    "count_color": Task(
        name="count_color",
        sample_scene=_scene_count_color,
        question=lambda scene: f"how many {scene['query']['color']} shapes are there ?",
        answer=lambda scene: str(sum(s["color"] == scene["query"]["color"] for s in scene["shapes"])),
        think=lambda scene, answer: f"{_listing(scene)} {scene['query']['color']} shapes are {answer} .",
        wrong_answers=lambda scene, answer: _near_digits(answer, 0, len(scene["shapes"])),
    ),
    "left_color": Task(
        name="left_color",
        sample_scene=_scene_left_color,
        question=lambda scene: f"what color is the {scene['query']['side']} shape ?",
        answer=_left_color_answer,
        think=lambda scene, answer: f"{_listing(scene)} the {scene['query']['side']} shape is {answer} .",
        wrong_answers=_left_color_wrong_answers,
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Answer formats
# ---------------------------------------------------------------------------------------------------------------


def format_answer(answer: str, answer_format: str = "answer", reasoning: str = "") -> str:
    """Render an answer word: ``<answer>red</answer>``, ``<think>...</think><answer>red</answer>`` or ``red``."""
    if answer_format == "answer":
        return f"<answer>{answer}</answer>"
    if answer_format == "think":
        return f"<think>{reasoning}</think><answer>{answer}</answer>"
    if answer_format == "plain":
        return answer
    raise ValueError(f"unknown answer_format {answer_format!r}; expected one of {ANSWER_FORMATS}")


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str | None) -> str | None:
    """The stripped content of the last ``<answer>...</answer>`` block.

    Without any ``<answer>`` tag the stripped text itself is the answer (the ``plain`` format). Returns ``None``
    when there is no answer: ``None`` or blank text, or an ``<answer>`` tag that is never closed.
    """
    if text is None:
        return None
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    if "<answer>" in text:
        return None
    stripped = text.strip()
    return stripped or None


# ---------------------------------------------------------------------------------------------------------------
# Rows and datasets
# ---------------------------------------------------------------------------------------------------------------


def _user_message(question: str) -> dict:
    """The user turn: the image placeholder, then the question."""
    return {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}


def _assistant_message(text: str) -> dict:
    """The assistant turn: one text block."""
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _split_bucket(split: str) -> int:
    """The background bucket (channel sum modulo 3) reserved for a split."""
    name = _SPLIT_ALIASES.get(split, split)
    if name not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_BUCKETS)}")
    return SPLIT_BUCKETS[name]


def _seed_int(seq: np.random.SeedSequence) -> int:
    """128 bits of a seed sequence as one int (a stable seed for ``random.Random``)."""
    return int.from_bytes(seq.generate_state(4).tobytes(), "little")


def _rngs(task: str, seed: int, split: str) -> tuple[random.Random, random.Random]:
    """Two independent generators (scenes, wrong answers) for one (task, seed, split).

    Scenes do not depend on the row format, so the same seed gives the same images in every format.
    """
    key = [int(seed), zlib.crc32(task.encode()), _split_bucket(split)]
    scene_seq, answer_seq = np.random.SeedSequence(key).spawn(2)
    return random.Random(_seed_int(scene_seq)), random.Random(_seed_int(answer_seq))


def _features(row_format: str) -> datasets.Features:
    """Explicit column types, so every dataset of a format has the same schema."""
    content = datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})
    message = {"role": datasets.Value("string"), "content": content}
    common = {
        "images": datasets.List(datasets.Image()),
        "solution": datasets.Value("string"),
        "task": datasets.Value("string"),
        "scene": datasets.Value("string"),
    }
    if row_format == "sft":
        return datasets.Features({"messages": datasets.List(message), **common})
    if row_format == "preference":
        return datasets.Features({"prompt": datasets.List(message), "chosen": datasets.List(message),
                                  "rejected": datasets.List(message), **common})
    if row_format == "prompt":
        return datasets.Features({"prompt": datasets.List(message), **common})
    raise ValueError(f"unknown format {row_format!r}; expected one of {ROW_FORMATS}")


def _png_bytes(image: Image.Image) -> dict:
    """An image as the ``{"bytes", "path"}`` value of datasets' Image feature, encoded once as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _make_row(task: Task, scene: dict, row_format: str, answer_format: str,
              answer_rng: random.Random) -> dict:
    """One dataset row for a scene."""
    solution = task.answer(scene)
    user = _user_message(task.question(scene))
    row = {"images": [_png_bytes(render_scene(scene))], "solution": solution, "task": task.name,
           "scene": json.dumps(scene, sort_keys=True)}

    def reply(answer: str) -> dict:
        return _assistant_message(format_answer(answer, answer_format, task.think(scene, answer)))

    if row_format == "sft":
        return {"messages": [user, reply(solution)], **row}
    if row_format == "preference":
        wrong = task.wrong_answers(scene, solution)
        return {"prompt": [user], "chosen": [reply(solution)],
                "rejected": [reply(_pick(answer_rng, wrong))], **row}
    return {"prompt": [user], **row}


def make_dataset(task: str = "color", format: str = "sft", n: int = 1000, seed: int = 0, split: str = "train",
                 image_size: int = 28, answer_format: str = "answer") -> datasets.Dataset:
    """Build ``n`` rows of a synthetic task as a ``datasets.Dataset``.

    Args:
        task: a key of ``TASKS``.
        format: ``"sft"`` (``messages``), ``"preference"`` (``prompt``/``chosen``/``rejected``) or ``"prompt"``.
        n: number of rows.
        seed: the same arguments always give the identical dataset (same image bytes).
        split: ``"train"``, ``"validation"`` or ``"test"``; splits never share an image.
        image_size: side of the square images in pixels.
        answer_format: ``"answer"``, ``"think"`` or ``"plain"`` (see ``format_answer``).

    Every row also has ``images`` (one PIL RGB image), ``solution`` (the answer word), ``task`` and ``scene``
    (JSON: ``image_size``, ``background`` rgb, ``shapes`` [kind, color, rgb, center, radius] and ``query``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer_format {answer_format!r}; expected one of {ANSWER_FORMATS}")
    features = _features(format)
    spec = TASKS[task]
    scene_rng, answer_rng = _rngs(task, seed, split)
    bucket = _split_bucket(split)
    rows = [_make_row(spec, spec.sample_scene(scene_rng, image_size, bucket), format, answer_format, answer_rng)
            for _ in range(n)]
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def make_data(task: str, format: str, n: int, seed: int, out: str | Path, split: str = "train",
              image_size: int = 28, answer_format: str = "answer", fmt: str = "disk") -> Path:
    """Build one split with ``make_dataset`` and save it with ``vlmalign.data.io.save_dataset``; return ``out``."""
    from vlmalign.data.io import save_dataset

    ds = make_dataset(task=task, format=format, n=n, seed=seed, split=split, image_size=image_size,
                      answer_format=answer_format)
    return save_dataset(ds, out, fmt=fmt)
