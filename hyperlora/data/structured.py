"""Structured shape tasks with headroom and known relations, drawn offline from a seed.

In the style of VTAB's structured tasks: each image shows a *target* object among distractors on a textured
background, and a task asks about one factor of the target (its orientation, size, position, shape, or how many
targets there are). Frozen pretrained features describe the whole scene; telling which object is the target and
reading one of its factors is what fine-tuning adds, so a linear probe on frozen features stays well below a
fine-tuned adapter on most factors.

Every task has a visual *domain* of its own (background colour and texture, target and distractor colours, object
kind), so that the task can be told from an image, as in DomainNet or ImageNet-R, and its classes are disjoint from
every other task's. Tasks that ask about the same factor are related by construction (``relation_matrix``).

Sequences (``SEQUENCES``): *mixed* cycles the factors, each task in a new look, and no task's distractor colour is
another task's target colour; *domain* asks one question in a new look per task, as DomainNet; *split* asks which
glyph the target is, in one look, four new glyphs per task, as CIFAR-100's splits; *conflict* is mixed
with the colours of the first version, where each task's distractor colour is the next one's target colour (an
adapter that learnt "attend to yellow" is told "ignore yellow" next): its relation matrix marks those pairs -1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .tasks import Task

__all__ = [
    "CLASSES_PER_TASK",
    "FACTORS",
    "GLYPHS",
    "SEQUENCES",
    "SHAPES",
    "SPLIT_FACTOR",
    "Domain",
    "TaskSpec",
    "relation_matrix",
    "render",
    "sequence",
    "shape_task",
    "structured_tasks",
]

FACTORS = ("orientation", "count", "size", "position", "shape")
CLASSES_PER_TASK = 4
SHAPES = ("circle", "square", "triangle", "cross")
_SUPERSAMPLE = 2


def _turn(point: tuple[float, float], quarter_turns: int) -> tuple[float, float]:
    x, y = point
    for _ in range(quarter_turns):
        x, y = -y, x
    return x, y


# Unit polygons, pointing along +x before rotation; a circle is drawn as an ellipse.
_POLYGONS = {
    "square": [(0.75, 0.75), (-0.75, 0.75), (-0.75, -0.75), (0.75, -0.75)],
    "triangle": [(1.0, 0.0), (-0.6, 0.55), (-0.6, -0.55)],
    # a plus sign: one quarter of its outline, turned by 90 degrees four times
    "cross": [(x, y) for turn in range(4) for x, y in [_turn(p, turn) for p in ((1.0, 0.3), (0.3, 0.3), (0.3, 1.0))]],
    "bar": [(1.0, 0.25), (-1.0, 0.25), (-1.0, -0.25), (1.0, -0.25)],
}
_BACKGROUNDS = (
    (25, 25, 70), (75, 25, 25), (25, 70, 30), (70, 70, 70), (90, 65, 15),
    (15, 70, 85), (80, 25, 85), (35, 35, 35), (40, 80, 60), (95, 45, 60),
)  # fmt: skip
_TEXTURES = ("solid", "stripes", "dots", "noise")
_COLOURS = (
    (250, 230, 40), (80, 220, 250), (250, 120, 200), (240, 240, 240),
    (120, 250, 120), (250, 150, 60), (170, 140, 250),
)  # fmt: skip
_KINDS = ("triangle", "square", "cross", "circle")
# mixed and domain sequences: targets and distractors from disjoint colours, so that no task ignores another's target
_TARGET_COLOURS, _DISTRACTOR_COLOURS = _COLOURS[:4], _COLOURS[4:]
SEQUENCES = ("mixed", "domain", "split", "conflict")
# The split sequence's question, "which symbol is the target?", over a vocabulary large enough for 20 four-class
# tasks: letters, digits and signs of Pillow's default font that do not look alike upright, then mirror images of
# those that are not symmetric. Its classes go to tasks in a fixed shuffled order, as CIFAR-100's splits do.
SPLIT_FACTOR = "glyph"
_GLYPH_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789abdefghmnqrty#$%&@?+=*!{}[]^~"
GLYPHS = tuple((char, False) for char in _GLYPH_CHARS) + tuple((char, True) for char in "BCDEFGJKLNPQRSZ2345679")
_GLYPH_ORDER = tuple(int(i) for i in np.random.default_rng(1993).permutation(len(GLYPHS)))


@dataclass(frozen=True)
class Domain:
    """What an image of one task looks like, whatever its label."""

    background: tuple[int, int, int]
    texture: str
    target: tuple[int, int, int]
    distractor: tuple[int, int, int]
    kind: str

    @classmethod
    def separated(cls, index: int) -> Domain:
        """The index-th look of the mixed and domain sequences: as ``of`` (backgrounds, textures, object kinds), but
        targets and distractors take disjoint colours, so no look's distractor is another look's target."""
        legacy = cls.of(index)
        target = index % len(_TARGET_COLOURS)
        distractor = (index + index // len(_TARGET_COLOURS)) % len(_DISTRACTOR_COLOURS)
        return cls(
            background=legacy.background,
            texture=legacy.texture,
            target=_TARGET_COLOURS[target],
            distractor=_DISTRACTOR_COLOURS[distractor],
            kind=legacy.kind,
        )

    @classmethod
    def of(cls, index: int) -> Domain:
        """The index-th domain: every (background, texture) pair and every target/distractor colour pair differ
        from those of the 19 domains around it, so that 20 tasks are 20 distinct looks."""
        target = index % len(_COLOURS)
        distractor = (target + 1 + index // len(_COLOURS)) % len(_COLOURS)
        return cls(
            background=_BACKGROUNDS[index % len(_BACKGROUNDS)],
            texture=_TEXTURES[(index + index // len(_BACKGROUNDS)) % len(_TEXTURES)],
            target=_COLOURS[target],
            distractor=_COLOURS[distractor],
            kind=_KINDS[index % len(_KINDS)],
        )


@dataclass(frozen=True)
class TaskSpec:
    """One structured task: the factor it asks about, its domain's index, and the palette (``Domain.separated``
    or, for the conflict sequence, ``Domain.of``) that turns the index into a look."""

    factor: str
    domain: int
    palette: str = "separated"
    split: int = 0  # the split sequence's share of the glyph vocabulary

    @property
    def name(self) -> str:
        suffix = f"-s{self.split:02d}" if self.factor == SPLIT_FACTOR else ""
        return f"{self.factor}-d{self.domain:02d}{suffix}"

    @property
    def values(self) -> tuple[int, ...]:
        """The factor's values that the task's four classes are (glyph indices for the split sequence)."""
        if self.factor == SPLIT_FACTOR:
            return _GLYPH_ORDER[CLASSES_PER_TASK * self.split : CLASSES_PER_TASK * (self.split + 1)]
        return tuple(range(CLASSES_PER_TASK))

    @property
    def look(self) -> Domain:
        return Domain.of(self.domain) if self.palette == "legacy" else Domain.separated(self.domain)


def sequence(num_tasks: int = 5, factors: tuple[str, ...] = FACTORS[:3], kind: str = "mixed") -> list[TaskSpec]:
    """The task order of a ``kind`` of sequence (``SEQUENCES``): mixed and conflict ask about the factors in turn,
    each task in a new domain, so that a factor comes back in another look; domain asks about ``factors[0]`` in
    every task, each in a new look; split asks which glyph the target is, in one look, four new glyphs per task
    (``factors`` unused)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if kind == "split":
        most = len(GLYPHS) // CLASSES_PER_TASK
        if num_tasks > most:
            raise ValueError(f"the split sequence has glyphs for {most} tasks, got num_tasks={num_tasks}")
        return [TaskSpec(SPLIT_FACTOR, 0, split=t) for t in range(num_tasks)]
    unknown = sorted(set(factors) - set(FACTORS))
    if unknown or not factors:
        raise ValueError(f"factors must be a non-empty subset of {FACTORS}, got {factors}")
    if kind not in SEQUENCES:
        raise ValueError(f"kind must be one of {SEQUENCES}, got {kind!r}")
    palette = "legacy" if kind == "conflict" else "separated"
    asked = factors[:1] if kind == "domain" else factors
    return [TaskSpec(asked[t % len(asked)], t, palette) for t in range(num_tasks)]


def relation_matrix(specs: list[TaskSpec]) -> np.ndarray:
    """1 where two tasks ask about the same factor (in different looks), -1 where one task's target colour is the
    other's distractor colour (what one learns to attend to, the other learns to ignore), 0 where they share
    nothing."""
    factors = np.array([spec.factor for spec in specs])
    related = (factors[:, None] == factors[None, :]).astype(float)
    looks = [spec.look for spec in specs]
    for i, a in enumerate(looks):
        for j, b in enumerate(looks):
            if i != j and (a.target == b.distractor or a.distractor == b.target):
                related[i, j] = -1.0
    return related


def structured_tasks(
    num_tasks: int = 5,
    *,
    seed: int = 0,
    train_per_class: int = 200,
    test_per_class: int = 50,
    validation_per_class: int = 0,
    later_train_per_class: int | None = None,
    image_size: int = 64,
    factors: tuple[str, ...] = FACTORS[:3],
    kind: str = "mixed",
) -> list[Task]:
    """``num_tasks`` structured tasks of 4 classes each, drawn deterministically from ``seed``: the ``kind`` of
    sequence (``SEQUENCES``) that ``sequence`` orders.

    Task t's labels are ``4t .. 4t+3``, so class sets are disjoint and a class-incremental learner sees 4 new classes
    per task. See ``relation_matrix(sequence(...))`` for which tasks are related. ``validation_per_class`` > 0 adds a
    validation split, drawn after the others: choose settings on it, never on the test split.
    ``later_train_per_class`` gives every task after the first that many training images per class (later tasks
    bringing few images, where what a task inherits matters most).
    """
    later = train_per_class if later_train_per_class is None else later_train_per_class
    return [
        shape_task(
            spec.name,
            spec.factor,
            spec.look,
            seed=(seed, t),
            train_per_class=train_per_class if t == 0 else later,
            test_per_class=test_per_class,
            validation_per_class=validation_per_class,
            image_size=image_size,
            first_label=CLASSES_PER_TASK * t,
            values=spec.values,
        )
        for t, spec in enumerate(sequence(num_tasks, factors, kind))
    ]


def shape_task(
    name: str,
    factor: str,
    domain: Domain,
    *,
    seed=0,
    train_per_class: int = 200,
    test_per_class: int = 50,
    validation_per_class: int = 0,
    image_size: int = 64,
    first_label: int = 0,
    values: Sequence[int] = tuple(range(CLASSES_PER_TASK)),
) -> Task:
    """One task asking about ``factor`` in ``domain`` (any colours), labels ``first_label .. first_label + 3`` for
    the factor's ``values``; ``seed`` is anything ``numpy.random.default_rng`` takes."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": Value("int64")})
    rng = np.random.default_rng(seed)
    splits = {}
    # validation last: the train and test images stay those of the same seed without one
    for split, per_class in (
        ("train", train_per_class),
        ("test", test_per_class),
        ("validation", validation_per_class),
    ):
        if per_class == 0 and split == "validation":
            break
        labels = rng.permutation(np.repeat(np.arange(CLASSES_PER_TASK), per_class))
        images = [render(factor, values[label], domain, rng, image_size) for label in labels]
        splits[split] = Dataset.from_dict(
            {"image": images, "label": (labels + first_label).tolist()}, features=features
        )
    return Task(name, splits["train"], splits["test"], splits.get("validation"))


# --- drawing ---------------------------------------------------------------------------------------------------------


@dataclass
class _Object:
    kind: str
    x: float
    y: float
    radius: float
    angle: float
    colour: tuple[int, int, int]


def render(factor: str, label: int, domain: Domain, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image whose target has ``label`` for ``factor``; everything else about it is drawn at random."""
    if factor not in (*FACTORS, SPLIT_FACTOR):
        raise ValueError(f"factor must be one of {(*FACTORS, SPLIT_FACTOR)}, got {factor!r}")
    levels = len(GLYPHS) if factor == SPLIT_FACTOR else CLASSES_PER_TASK
    if not 0 <= label < levels:
        raise ValueError(f"label must be in 0..{levels - 1} for {factor}, got {label}")
    scale = size / 64.0  # geometry is designed on a 64 px canvas
    while True:
        objects = _scene(factor, label, domain, rng)
        if objects is not None:
            break
    canvas = _background(domain, rng, size * _SUPERSAMPLE)
    for obj in objects:
        _draw(canvas, obj, scale * _SUPERSAMPLE)
    return canvas.resize((size, size), Image.LANCZOS)


def _scene(factor: str, label: int, domain: Domain, rng: np.random.Generator) -> list[_Object] | None:
    """Target(s) then 1-3 distractors of the distractor colour that vary in the asked factor; None to redraw."""
    placed: list[_Object] = []
    kind = "bar" if factor == "orientation" else domain.kind

    def put(kind: str, radius: float, colour, x: float | None = None) -> bool:
        for _ in range(100):
            cx = rng.uniform(radius + 1, 63 - radius) if x is None else x
            cy = rng.uniform(radius + 1, 63 - radius)
            if all(math.hypot(cx - o.x, cy - o.y) > 1.15 * (radius + o.radius) for o in placed):
                placed.append(_Object(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi), colour))
                return True
        return False

    radius = rng.uniform(6.0, 10.0)
    if factor == "orientation":
        ok = put(kind, radius + 2, domain.target)
        if ok:
            placed[-1].angle = label * math.pi / 4 + rng.uniform(-0.2, 0.2)
    elif factor == "size":
        ok = put(kind, (4.5, 7.0, 9.5, 12.0)[label] + rng.uniform(-0.8, 0.8), domain.target)
    elif factor == "position":
        width = (62 - 2 * radius) / CLASSES_PER_TASK
        ok = put(kind, radius, domain.target, x=radius + 1 + width * (label + rng.uniform(0.1, 0.9)))
    elif factor == "shape":
        ok = put(SHAPES[label], radius, domain.target)
    elif factor == SPLIT_FACTOR:
        ok = put(f"glyph{label}", radius, domain.target)
    else:  # count
        ok = all(put(kind, rng.uniform(4.5, 6.5), domain.target) for _ in range(label + 1))
    if not ok:
        return None
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(4.5, 6.5) if factor == "count" else rng.uniform(4.5, 12.0)
        distractor_kind = SHAPES[rng.integers(len(SHAPES))] if factor == "shape" else kind
        if factor == SPLIT_FACTOR:  # another glyph of the vocabulary, the target's size
            radius, distractor_kind = (
                rng.uniform(6.0, 10.0),
                f"glyph{(label + rng.integers(1, len(GLYPHS))) % len(GLYPHS)}",
            )
        put(distractor_kind, radius + (2 if distractor_kind == "bar" else 0), domain.distractor)
    return placed


def _background(domain: Domain, rng: np.random.Generator, size: int) -> Image.Image:
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = domain.background
    period = size // 8
    if domain.texture == "stripes":
        pixels[(np.arange(size) // (period // 2)) % 2 == 1] *= 1.6
    elif domain.texture == "dots":
        rows, cols = np.mgrid[0:size, 0:size]
        dots = (rows % period < period // 4) & (cols % period < period // 4)
        pixels[dots] = pixels[dots] * 2.2 + 40
    elif domain.texture == "noise":
        pixels += rng.normal(0.0, 25.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@functools.cache
def _glyph_mask(index: int, size: int) -> Image.Image:
    """The index-th glyph as a square ink mask of ``size`` pixels, mirrored where the vocabulary says."""
    char, mirrored = GLYPHS[index]
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).text((size / 2, size / 2), char, font=ImageFont.load_default(size=size), fill=255, anchor="mm")
    return mask.transpose(Image.FLIP_LEFT_RIGHT) if mirrored else mask


def _draw(canvas: Image.Image, obj: _Object, scale: float) -> None:
    if obj.kind.startswith("glyph"):
        size = round(2.5 * obj.radius * scale)  # the ink of a glyph fills about two thirds of its font size
        corner = (round(obj.x * scale - size / 2), round(obj.y * scale - size / 2))
        canvas.paste(obj.colour, (*corner, corner[0] + size, corner[1] + size), _glyph_mask(int(obj.kind[5:]), size))
        return
    draw = ImageDraw.Draw(canvas)
    if obj.kind == "circle":
        r = 0.8 * obj.radius
        box = [(obj.x - r) * scale, (obj.y - r) * scale, (obj.x + r) * scale, (obj.y + r) * scale]
        draw.ellipse(box, fill=obj.colour)
        return
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    points = [
        ((obj.x + obj.radius * (px * c - py * s)) * scale, (obj.y - obj.radius * (px * s + py * c)) * scale)
        for px, py in _POLYGONS[obj.kind]
    ]
    draw.polygon(points, fill=obj.colour)
