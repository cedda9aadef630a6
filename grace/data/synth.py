"""The default demo image set: coloured shapes with compositional captions.

Built to be a real retrieval task on 2 CPU cores: every attribute (colour, shape, size, position,
background) is shared by many images, so a query has to combine several of them to single out
one image. Scenes are unique; each image has several paraphrased captions. The same seed writes
the same bytes, so a regenerated ``data/`` leaves ``dvc status`` clean.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from grace.atomic_io import atomic_dir
from grace.data.imageset import CAPTIONS_FILE, IMAGES_DIR, scan_image_set, write_caption_rows
from grace.data.records import ImageRecord

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "brown": (110, 80, 50)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.16, "large": 0.3}  # half-extent as a share of the image side
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SHAPE_COUNT_WEIGHTS = {1: 0.25, 2: 0.5, 3: 0.25}
SYNONYMS = {
    "circle": ("circle", "disk", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangle", "wedge"),
    "cross": ("cross", "plus sign", "cross"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: its colour, kind and size, in a cell of the 3 x 3 grid."""

    colour: str
    kind: str
    size: str
    row: int
    col: int

    def place(self) -> str:
        r, c = ROWS[self.row], COLS[self.col]
        if r == "middle" and c == "center":
            return "in the center"
        if r == "middle":
            return f"on the {c}"
        if c == "center":
            return f"at the {r}"
        return f"in the {r} {c}"

    def name(self, rng: random.Random, with_size: bool = True) -> str:
        words = [rng.choice(SYNONYMS[self.size])] if with_size else []
        return " ".join(words + [self.colour, rng.choice(SYNONYMS[self.kind])])


@dataclass(frozen=True)
class Scene:
    """One synthetic image: a background colour and its shapes."""

    background: str
    shapes: tuple[Shape, ...]


def synthesize(
    out: str | os.PathLike,
    n: int = 1000,
    seed: int = 0,
    size: int = 64,
    test_fraction: float = 0.2,
) -> list[ImageRecord]:
    """Write ``n`` images and their captions to ``out`` (replaced atomically); return records."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    rng = random.Random(seed)
    scenes = _unique_scenes(rng, n)
    n_test = round(n * test_fraction)
    test_ids = set(rng.sample(range(n), n_test))
    rows = []
    with atomic_dir(out) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        for i, scene in enumerate(scenes):
            name = f"{i:05d}.png"
            (tmp / IMAGES_DIR / name).write_bytes(render(scene, size, rng))
            split = "test" if i in test_ids else "train"
            rows += [{"image": name, "caption": c, "split": split} for c in captions(scene, rng)]
        write_caption_rows(rows, tmp / CAPTIONS_FILE)
        records = scan_image_set(tmp)
    return records


def _unique_scenes(rng: random.Random, n: int) -> list[Scene]:
    seen: set[Scene] = set()
    scenes: list[Scene] = []
    counts, weights = zip(*SHAPE_COUNT_WEIGHTS.items(), strict=True)
    attempts = 0
    while len(scenes) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct scenes")
        k = rng.choices(counts, weights)[0]
        cells = rng.sample([(r, c) for r in range(3) for c in range(3)], k)
        drawn = [
            Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)), r, c)
            for r, c in cells
        ]
        shapes = tuple(sorted(drawn, key=lambda s: (s.row, s.col)))
        scene = Scene(rng.choice(list(BACKGROUNDS)), shapes)
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
    return scenes


def render(scene: Scene, size: int, rng: random.Random) -> bytes:
    """PNG bytes of a scene; small seeded jitter so no two images are pixel templates."""
    im = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    cell = size / 3
    for s in scene.shapes:
        cx = (s.col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (s.row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        r = SIZES[s.size] * size * 0.5 * rng.uniform(0.9, 1.1)
        fill = COLOURS[s.colour]
        box = (cx - r, cy - r, cx + r, cy + r)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            w = r / 3
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def captions(scene: Scene, rng: random.Random) -> list[str]:
    """Three to four paraphrases; together they name every attribute of every shape."""
    shapes, bg = scene.shapes, scene.background
    listing = _join([f"a {s.name(rng)} {s.place()}" for s in shapes])
    out = [f"{listing} on a {bg} background"]
    if len(shapes) == 1:
        s = shapes[0]
        out.append(f"a {bg} image with a {s.name(rng)} {s.place()}")
        out.append(f"{s.place()} of a {bg} picture there is a {s.name(rng)}")
    else:
        a, b = rng.sample(shapes, 2)
        out.append(
            f"a {a.name(rng)} {_relation(a, b)} a {b.name(rng, with_size=False)}, {bg} background"
        )
        kinds = _join([f"a {s.colour} {rng.choice(SYNONYMS[s.kind])}" for s in shapes])
        out.append(f"{_count(len(shapes))} shapes on {bg}: {kinds}")
    if rng.random() < 0.5:
        s = rng.choice(shapes)
        out.append(f"{s.place()} a {s.name(rng)}, the background is {bg}")
    return out


def _relation(a: Shape, b: Shape) -> str:
    if a.row < b.row:
        return "above"
    if a.row > b.row:
        return "below"
    return "left of" if a.col < b.col else "right of"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count(k: int) -> str:
    return {2: "two", 3: "three"}.get(k, str(k))
